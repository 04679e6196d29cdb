"""Parity of ONNX exports against torch, greedy generation through ORT, the harness itself and
`toolchain validate` (pass, fail on a perturbed weight, bad inputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from export_cases import build_dir, export_root, exported, sliced_model
from runtime.generate import greedy_generate, positions_from_mask
from runtime.parity import (TOLERANCES, Tolerances, check_parity, compare, make_inputs, run_steps, to_markdown,
                            top1_agreement)
from runtime.sessions import OrtSession, TorchSession
from tiny_models import ARCHS, VOCAB, tiny_hf_model
from toolchain.app.cli import app
from toolchain.core.errors import BackendUnavailableError, InvalidOptionError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return export_root(tmp_path_factory)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_onnx_matches_torch(arch, root):
    report = check_parity(TorchSession(sliced_model(arch)), OrtSession(exported(arch, "fp32", root)), "fp32",
                          vocab_size=VOCAB)
    assert [s["step"] for s in report["steps"]] == ["prefill", "decode1", "decode2", "decode3"]
    assert report["inputs"]["left_padding"] == [0, 3]
    assert report["summary"]["logits"]["max_abs"] <= 1e-4
    assert report["summary"]["present"]["max_abs"] <= 1e-4
    assert report["summary"]["logits"]["top1"] == 1.0
    assert report["passed"]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_onnx_agrees_with_fp32_torch(arch, root):
    inputs = make_inputs(VOCAB)
    reference = run_steps(TorchSession(sliced_model(arch)), inputs)
    candidate = run_steps(OrtSession(exported(arch, "fp16", root)), inputs)
    for step in candidate.steps:  # finite everywhere, padded rows included (fp32 softmax island)
        assert np.isfinite(step.logits).all() and step.logits.dtype == np.float32
        assert all(np.isfinite(k).all() and np.isfinite(v).all() and k.dtype == np.float16 for k, v in step.present)
    report = compare(reference, candidate, TOLERANCES["fp16"], "fp16", inputs)
    assert report["summary"]["logits"]["top1"] >= 0.99
    assert report["passed"], report["checks"]


def test_fp16_top1_excuses_only_near_ties():
    """A differing argmax counts as agreement only when the reference's two logits are closer than
    fp16's epsilon at the row's scale; a real flip still fails the fp16 bar."""
    eps = TOLERANCES["fp16"].logits_top1_tie
    assert eps == float(np.finfo(np.float16).eps)
    reference = np.array([[4.0, 4.0 - 2e-3, 0.0], [4.0, 3.0, 0.0]], np.float32)  # tie: 2e-3 < 4·eps ≈ 3.9e-3
    near_tie = np.array([[4.0, 4.001, 0.0], [4.0, 3.0, 0.0]], np.float32)
    assert top1_agreement(reference, near_tie, eps) == 1.0 and top1_agreement(reference, near_tie) == 0.5
    real_flip = np.array([[4.0, 3.0, 0.0], [3.0, 4.0, 0.0]], np.float32)  # margin 1.0 ≫ 4·eps
    assert top1_agreement(reference, real_flip, eps) == 0.5

    def result(logits):
        from runtime.parity import RunnerResult, Step

        rows = np.ones((1, 2), bool)
        return RunnerResult("r", [Step("prefill", logits[None], [], rows, rows)], 0.0)

    tie_report = compare(result(reference), result(near_tie), TOLERANCES["fp16"], "fp16")
    check = next(c for c in tie_report["checks"] if "top-1" in c["check"])
    assert tie_report["passed"] and check["value"] == 1.0 and check["strict"] == 0.5
    assert not compare(result(reference), result(real_flip), TOLERANCES["fp16"], "fp16")["passed"]
    # fp32 has no tie rule: its bar is the max abs error
    assert "top1_with_ties" not in compare(result(reference), result(near_tie), Tolerances(logits_max_abs=1e-4),
                                           "fp32")["summary"]["logits"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_through_ort_equals_torch(arch, root):
    prompt = make_inputs(VOCAB, prompt=10, pad=4, seed=3)
    torch_tokens = greedy_generate(TorchSession(sliced_model(arch)), prompt.input_ids, prompt.attention_mask, 32)
    ort_tokens = greedy_generate(OrtSession(exported(arch, "fp32", root)), prompt.input_ids, prompt.attention_mask, 32)
    assert torch_tokens.shape == (2, 32)
    np.testing.assert_array_equal(ort_tokens, torch_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_session_runs_plain_hf_models(arch):
    """TorchSession over the HF model (DynamicCache) and over its canonical twin agree step by step."""
    from toolchain.model.adapters import to_canonical

    hf = tiny_hf_model(arch)
    report = check_parity(TorchSession(to_canonical(tiny_hf_model(arch))), TorchSession(hf, "hf"), "fp32",
                          vocab_size=VOCAB)
    assert report["passed"], report["checks"]


def test_generate_matches_hf_generate():
    """Left-padded greedy decoding through a Session reproduces transformers' own generate()."""
    import torch

    hf = tiny_hf_model("llama")
    prompt = make_inputs(VOCAB, prompt=8, pad=3, seed=5)
    ours = greedy_generate(TorchSession(hf), prompt.input_ids, prompt.attention_mask, 8)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt.input_ids), attention_mask=torch.from_numpy(prompt.attention_mask),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, theirs[:, prompt.input_ids.shape[1]:].numpy())


def test_positions_from_mask():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 1, 2, 3], [0, 0, 0, 1]])


class Doctored:
    """A session wrapper that edits the logits of another (to test the harness)."""

    def __init__(self, inner, edit):
        self.inner, self.edit, self.name = inner, edit, "doctored"
        self.kv_shapes, self.kv_dtype, self.empty_past = inner.kv_shapes, inner.kv_dtype, inner.empty_past

    def run(self, ids, mask, positions, past):
        logits, present = self.inner.run(ids, mask, positions, past)
        logits = logits.copy()
        self.edit(logits, mask[:, -ids.shape[1]:])
        return logits, present


def test_harness_ignores_padded_positions_and_catches_errors():
    reference = TorchSession(sliced_model("llama"))

    def garbage_in_padding(logits, mask):
        logits[mask == 0] = 1e6

    def nan_in_real_token(logits, mask):
        logits[0, -1, 0] = np.nan

    def small_shift(logits, mask):
        logits += 1e-3

    padded = check_parity(reference, Doctored(reference, garbage_in_padding), vocab_size=VOCAB)
    assert padded["passed"] and padded["summary"]["logits"]["max_abs"] == 0.0
    nan = check_parity(reference, Doctored(reference, nan_in_real_token), vocab_size=VOCAB)
    assert not nan["passed"] and not nan["summary"]["logits"]["finite"]
    shifted = check_parity(reference, Doctored(reference, small_shift), vocab_size=VOCAB)
    assert not shifted["passed"] and shifted["summary"]["logits"]["top1"] == 1.0
    json.dumps(shifted)  # plain JSON
    assert "FAIL" in to_markdown(shifted) and "PASS" in to_markdown(padded)


def test_provider_errors(root):
    path = exported("llama", "fp32", root)
    with pytest.raises(InvalidOptionError, match="unknown --provider"):
        OrtSession(path, provider="tpu")
    with pytest.raises(BackendUnavailableError, match="not available"):
        OrtSession(path, provider="tensorrt")


def perturb_largest_weight(onnx_dir: Path, amount: float = 0.02) -> None:
    model = onnx.load(str(onnx_dir / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(array + np.asarray(amount, array.dtype), tensor.name))
    onnx.save(model, str(onnx_dir / "model.onnx"))


def test_cli_validate_build_dir_passes_then_fails_on_perturbed_weight(root, tmp_path):
    build = build_dir("llama", root)
    reports = tmp_path / "reports"
    ok = CliRunner().invoke(app, ["validate", str(build), "--provider", "cpu", "--report", str(reports)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((reports / "parity.json").read_text())["passed"] is True
    assert "PASS" in (reports / "parity.md").read_text()

    broken = tmp_path / "broken"
    shutil.copytree(build, broken)  # follows the onnx/ symlink: a real copy
    perturb_largest_weight(broken / "onnx")
    bad = CliRunner().invoke(app, ["validate", str(broken)])
    assert bad.exit_code == 1, bad.output
    report = json.loads((broken / "reports" / "parity.json").read_text())
    assert report["passed"] is False and report["summary"]["logits"]["max_abs"] > 1e-4


def test_cli_validate_two_paths_picks_fp16_tolerances(root, tmp_path):
    build = build_dir("qwen2", root)
    result = CliRunner().invoke(app, ["validate", str(build / "sliced"), str(exported("qwen2", "fp16", root)),
                                      "--report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["dtype"] == "fp16" and [c["check"] for c in report["checks"]][1] == "logits top-1 agreement"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_build", "not a build dir"),
    ("truncated", "corrupted or truncated"),
    ("provider", "unknown --provider"),
    ("cuda", "not available"),
])
def test_cli_validate_bad_input(root, tmp_path, case, message):
    build = build_dir("llama", root)
    args = ["validate", str(build), "--report", str(tmp_path / "reports")]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
    elif case == "not_build":
        (tmp_path / "plain").mkdir()
        args[1] = str(tmp_path / "plain")
    elif case == "truncated":
        onnx_dir = tmp_path / "onnx"
        shutil.copytree(build / "onnx", onnx_dir)
        data = (onnx_dir / "model.onnx").read_bytes()
        (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 3])
        args[1:2] = [str(build / "sliced"), str(onnx_dir)]
    elif case == "provider":
        args += ["--provider", "tpu"]
    else:
        args += ["--provider", "cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "reports").exists()  # no partial report
