"""An ONNX export dir opens as is in optimum, in a separate environment with transformers 4.x.

optimum-onnx pins transformers below 5, so it cannot share this venv: the test builds a throwaway one
(`pip install optimum-onnx onnxruntime` with this venv's torch release) and skips, naming the reason,
when that cannot be done (no package index reachable). There `ORTModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read our onnx/ dir unchanged, and greedy generation on a left-padded
batch must give the tokens our torch model gives.
"""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 1200
PROMPTS = ["the cat sat on the", "in the"]
NEW_TOKENS = 12

OPTIMUM_GENERATE = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer, __version__

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], padding_side="left")
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
batch = tokenizer(json.loads(sys.argv[2]), return_tensors="pt", padding=True)
out = model.generate(**batch, do_sample=False, max_new_tokens=int(sys.argv[3]), min_new_tokens=int(sys.argv[3]),
                     pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"transformers": __version__, "tokenizer": type(tokenizer).__name__, "pad": tokenizer.pad_token_id,
                  "input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist(),
                  "output": out.tolist()}))
"""


@pytest.fixture(scope="module")
def optimum_python(tmp_path_factory) -> Path:
    import torch

    env = tmp_path_factory.mktemp("optimum-venv")
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    release = torch.__version__.split("+")[0]  # the CPU wheel this machine already has
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"torch=={release}", "optimum-onnx", "onnxruntime"],
                          check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot build a venv with optimum-onnx here (pip exit {proc.returncode}: {last})")
    return python


@pytest.fixture(scope="module")
def sliced_export(tmp_path_factory) -> tuple[Path, Path]:
    from exporters.onnx import export_onnx
    from toolchain.compress.options import CompressOptions
    from toolchain.compress.stage import compress_to_dir

    root = tmp_path_factory.mktemp("optimum-model")
    checkpoint = save_tiny_checkpoint("llama", root / "checkpoint")
    compress_to_dir(CompressOptions(model=str(checkpoint), slice=0.3, nsamples=4, seqlen=32), root / "sliced")
    export_onnx(root / "sliced", root / "onnx")
    return root / "sliced", root / "onnx"


def test_optimum_generates_what_torch_generates(optimum_python, sliced_export):
    import torch
    from transformers import AutoModelForCausalLM

    import toolchain.model.modeling  # noqa: F401  (registers the canonical model)

    sliced, onnx_dir = sliced_export
    proc = subprocess.run([str(optimum_python), "-c", OPTIMUM_GENERATE, str(onnx_dir), json.dumps(PROMPTS),
                           str(NEW_TOKENS)], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["transformers"].startswith("4.")  # the point: a transformers 4.x user
    assert result["tokenizer"] == "PreTrainedTokenizerFast"
    mask = torch.tensor(result["attention_mask"])
    assert (mask == 0).any()  # the batch really is left-padded

    model = AutoModelForCausalLM.from_pretrained(sliced).eval()
    expected = model.generate(input_ids=torch.tensor(result["input_ids"]), attention_mask=mask, do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              pad_token_id=result["pad"])
    assert result["output"] == expected.tolist()
    assert len(result["output"][0]) == len(result["input_ids"][0]) + NEW_TOKENS
