"""`toolchain build`: stages, manifest, resume after a kill, determinism, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tiny_models import save_tiny_checkpoint
from toolchain.app.cli import app
from toolchain.core.fileio import sha256_file

FAST = ["--nsamples", "4", "--seqlen", "32", "--no-bench"]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "b"
    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


def manifest(build: Path) -> dict:
    return json.loads((build / "manifest.json").read_text())


def test_build_writes_every_stage_with_hashes(built):
    data = manifest(built)
    assert list(data["stages"]) == ["compress", "export", "validate"]
    for record in data["stages"].values():
        assert record["status"] == "done"
        assert record["outputs"] and all(len(h) == 64 for h in record["outputs"].values())
        assert "torch" in record["versions"]
    assert "model.safetensors" in data["stages"]["compress"]["outputs"]
    assert "model.onnx" in data["stages"]["export"]["outputs"]
    assert json.loads((built / "reports/parity/parity.json").read_text())["passed"] is True


def test_quantize_and_deploy_in_one_build(built, checkpoint, tmp_path):
    """`--quantize int4 --deploy genai` adds two stages on top of the fp32 build (which resumes), and the
    genai package generates exactly what ORT generates on the quantized graph."""
    import numpy as np
    import onnx

    from exporters.genai import genai_generate
    from runtime.generate import greedy_generate
    from runtime.sessions import OrtSession

    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "q"
    shutil.copytree(built, out)
    args = ["build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--out", out, "--json", *FAST]
    result = run_cli(*args, "--quantize", "int4", "--deploy", "genai")
    assert result.exit_code == 0, result.output
    events = {e["stage"]: e["event"] for e in map(json.loads, result.stdout.splitlines()) if "stage" in e}
    assert events == {"compress": "skip", "export": "skip", "validate": "skip", "quantize": "done", "deploy": "done"}
    stages = manifest(out)["stages"]
    assert list(stages) == ["compress", "export", "validate", "quantize", "deploy"]  # pipeline order, not run order
    assert "model.onnx" in stages["quantize"]["outputs"] and "genai_config.json" in stages["deploy"]["outputs"]
    report = json.loads((out / "quantized" / "quantize_report.json").read_text())
    sizes = report["sizes"]  # a tiny model is mostly fp32 embedding table: compare with the expected size
    assert report["quantization"]["mode"] == "int4" and sizes["ratio"] < 0.8
    assert abs(sizes["ratio"] / sizes["expected_ratio"] - 1) < 0.10, sizes
    # int4 on random weights: most greedy tokens still agree, and perplexity moves but stays close
    parity = report["parity"]
    assert parity["top1"] >= 0.5 and abs(parity["ppl_quantized"] / parity["ppl_fp32"] - 1) < 0.5, parity
    assert "ptb" in report["parity"]["inputs"]  # parity on the calibration text, not random ids
    nodes = onnx.load(str(out / "deploy" / "model.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits  # the package holds the quantized graph, with ORT's fast CPU kernel (--quant-compute int8)
    assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nbits} == {4}
    prompt = [5, 17, 33, 90, 12, 7]
    expected = greedy_generate(OrtSession(out / "quantized"), np.array([prompt]), max_new_tokens=8, eos_token_id=2)
    assert genai_generate(out / "deploy", prompt, 8) == expected[0].tolist()

    result = run_cli(*args, "--quantize", "int4", "--deploy", "triton")  # only the package changes
    assert result.exit_code == 0, result.output
    events = {e["stage"]: e["event"] for e in map(json.loads, result.stdout.splitlines()) if "stage" in e}
    assert events["quantize"] == "skip" and events["deploy"] == "done"
    assert (out / "deploy" / "llm" / "config.pbtxt").is_file() and (out / "deploy" / "llm" / "1" / "model.onnx").is_file()


def copy_of(built: Path, tmp_path: Path) -> Path:
    """A private copy of the module's build: tests that rebuild must not change what others read."""
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def test_rerun_skips_and_changed_option_redoes_only_later_stages(built, checkpoint, tmp_path):
    built = copy_of(built, tmp_path)
    before = manifest(built)
    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--out", built, "--json",
                     *FAST)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if "stage" in e] == ["skip", "skip", "skip"]
    assert manifest(built)["stages"] == before["stages"]

    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--dtype", "fp16",
                     "--out", built, "--json", *FAST)
    assert result.exit_code == 0, result.output
    events = {e["stage"]: e["event"] for e in map(json.loads, result.stdout.splitlines()) if "stage" in e}
    assert events["compress"] == "skip" and events["export"] == "done" and events["validate"] == "done"
    assert manifest(built)["stages"]["export"]["options"] == {"dtype": "fp16"}


def test_tampered_output_is_rebuilt(built, checkpoint, tmp_path):
    built = copy_of(built, tmp_path)
    parity = built / "reports/parity/parity.md"
    parity.write_text("tampered")
    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--out", built, "--json",
                     *FAST)
    assert result.exit_code == 0, result.output
    events = {e["stage"]: e["event"] for e in map(json.loads, result.stdout.splitlines()) if "stage" in e}
    assert events == {"compress": "skip", "export": "skip", "validate": "done"}
    assert parity.read_text() != "tampered"
    assert manifest(built)["stages"]["validate"]["outputs"]["parity.md"] == sha256_file(parity)


def test_same_inputs_give_identical_bytes(built, checkpoint, tmp_path):
    out = tmp_path / "again"
    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--target", "onnx", "--out", out, "--quiet",
                     *FAST)
    assert result.exit_code == 0, result.output
    first, second = manifest(built)["stages"], manifest(out)["stages"]
    assert first["compress"]["outputs"] == second["compress"]["outputs"]
    assert first["export"]["outputs"]["model.onnx"] == second["export"]["outputs"]["model.onnx"]


def test_in_memory_and_offloaded_activations_give_the_streamed_bytes(built, checkpoint, tmp_path):
    """`toolchain slice --no-stream --offload-activations DIR` writes the bytes the streamed build wrote,
    and leaves no activation files behind."""
    (tmp_path / "acts").mkdir()
    out = tmp_path / "sliced"
    result = run_cli("slice", "--model", checkpoint, "--slice", "0.3", "--nsamples", "4", "--seqlen", "32",
                     "--no-stream", "--offload-activations", tmp_path / "acts", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == (built / "sliced" / "model.safetensors").read_bytes()
    report = json.loads((out / "compression_report.json").read_text())
    assert report["options"]["stream"] is False and report["options"]["offload_activations"] is True
    assert report["device"] == "cpu" and not any((tmp_path / "acts").iterdir())


def test_killed_build_resumes_to_identical_outputs(checkpoint, built, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "toolchain.app.cli", "build", "--model", str(checkpoint), "--slice", "0.3",
               "--target", "onnx", "--out", str(out), "--quiet", *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill while the export stage runs
            path = out / "manifest.json"
            if path.exists() and manifest(out)["stages"].get("export", {}).get("status") == "running":
                break
            if proc.poll() is not None:
                pytest.fail("the build finished before it could be killed")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert manifest(out)["stages"]["export"]["status"] == "running"
    assert not (out / "onnx").exists(), "a killed stage must not leave an output under its final name"

    result = run_cli(*command[3:-len(FAST) - 1], "--json", *FAST)
    assert result.exit_code == 0, result.output
    events = {e["stage"]: e["event"] for e in map(json.loads, result.stdout.splitlines()) if "stage" in e}
    assert events == {"compress": "skip", "export": "done", "validate": "done"}
    assert not list(out.glob(".*.tmp-*")), "stale temp dirs are cleaned on resume"
    reference = manifest(built)["stages"]
    resumed = manifest(out)["stages"]
    assert resumed["compress"]["outputs"] == reference["compress"]["outputs"]
    assert resumed["export"]["outputs"]["model.onnx"] == reference["export"]["outputs"]["model.onnx"]


def test_inspect_prints_the_manifest(built):
    result = run_cli("inspect", built)
    assert result.exit_code == 0
    assert "compress" in result.output and "model.safetensors" in result.output


# --- bad input: one clear line, exit code 2, nothing half-written ---------------------------------


def assert_one_error_line(result, fragment: str) -> None:
    """The CLI's contract for a user mistake: exit code 2 and exactly one `error:` line naming it (after
    the `> stage` line of the stage that found it, if any)."""
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("> ")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment.lower() in lines[0].lower(), result.output


def _variant(checkpoint: Path, tmp: Path, name: str, edit) -> Path:
    target = tmp / name
    shutil.copytree(checkpoint, target)
    edit(target)
    return target


def _truncate(path: Path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt(path: Path):
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _bad_shapes(path: Path):
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(config))


def _unsupported(path: Path):
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=64, n_layer=2, n_head=4)
    (path / "config.json").write_text(json.dumps(config))


def _no_tokenizer(path: Path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


def _pickle_only(path: Path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _text_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# (case id, extra CLI args or a callable building them, expected fragment of the message)
BUILD_CASES = [
    ("unknown-hub-id-offline", lambda c, t: ["--model", "nobody-here/no-such-model"], "not in the hugging face cache"),
    ("missing-dir", lambda c, t: ["--model", str(t / "nowhere")], "does not exist"),
    ("dir-without-config", lambda c, t: ["--model", str((t / "empty").mkdir() or t / "empty")], "config.json"),
    ("unsupported-architecture", lambda c, t: ["--model", str(_variant(c, t, "gpt2", _unsupported))], "supported"),
    ("corrupted-safetensors", lambda c, t: ["--model", str(_variant(c, t, "corrupt", _corrupt))], "safetensors"),
    ("truncated-safetensors", lambda c, t: ["--model", str(_variant(c, t, "trunc", _truncate))], "safetensors"),
    ("mismatched-shapes", lambda c, t: ["--model", str(_variant(c, t, "shapes", _bad_shapes))], "shape"),
    ("tokenizer-missing", lambda c, t: ["--model", str(_variant(c, t, "notok", _no_tokenizer))], "tokenizer"),
    ("pickle-weights", lambda c, t: ["--model", str(_variant(c, t, "pickle", _pickle_only))], "safetensors"),
    ("slice-zero", lambda c, t: ["--slice", "0"], "--slice"),
    ("slice-negative", lambda c, t: ["--slice", "-0.2"], "--slice"),
    ("slice-one", lambda c, t: ["--slice", "1"], "--slice"),
    ("slice-above-one", lambda c, t: ["--slice", "1.5"], "--slice"),
    ("slice-not-a-number", lambda c, t: ["--slice", "abc"], "--slice"),
    ("slice-width-rounds-to-zero", lambda c, t: ["--slice", "0.95"], "leaves no width"),
    ("nsamples-zero", lambda c, t: ["--nsamples", "0"], "--nsamples"),
    ("seqlen-zero", lambda c, t: ["--seqlen", "0"], "--seqlen"),
    ("seqlen-above-model-max", lambda c, t: ["--seqlen", "4096"], "maximum"),
    ("calibration-file-empty", lambda c, t: ["--calib", str(_text_file(t, "empty.txt", b""))], "empty"),
    ("calibration-too-short", lambda c, t: ["--calib", str(_text_file(t, "short.txt", b"a few words only"))],
     "tokens"),
    ("calibration-not-utf8", lambda c, t: ["--calib", str(_text_file(t, "latin.txt", b"caf\xe9 \xff\xfe" * 50))],
     "UTF-8"),
    ("unknown-dataset", lambda c, t: ["--calib", "imaginary-corpus"], "unknown dataset"),
    ("unknown-target", lambda c, t: ["--target", "tflite"], "--target"),
    ("unknown-dtype", lambda c, t: ["--dtype", "int3"], "--dtype"),
    ("fp16-on-torch-target", lambda c, t: ["--target", "torch", "--dtype", "fp16"], "torch target"),
    ("cuda-device-absent", lambda c, t: ["--device", "cuda"], "CUDA"),
    ("unknown-device", lambda c, t: ["--device", "tpu"], "--device"),
    ("offload-dir-missing", lambda c, t: ["--offload-activations", str(t / "no-such-dir")], "--offload-activations"),
    ("ort-provider-absent", lambda c, t: ["--provider", "tensorrt"], "TensorrtExecutionProvider"),
    ("ort-provider-unknown", lambda c, t: ["--provider", "npu9000"], "provider"),
    ("unknown-method", lambda c, t: ["--method", "magic"], "--method"),
    ("modegpt-compression-out-of-range", lambda c, t: ["--method", "modegpt", "--compression", "1.5"],
     "--compression"),
    ("unknown-rotation", lambda c, t: ["--rotation", "spiral"], "--rotation"),
    ("unknown-tie-mode", lambda c, t: ["--tie", "knot"], "--tie"),
    ("widths-not-integers", lambda c, t: ["--widths", "a,b"], "--widths"),
    ("widths-wrong-count", lambda c, t: ["--widths", "32,32"], "--widths"),
    ("eval-unknown-dataset", lambda c, t: ["--eval", "imaginary-corpus"], "unknown dataset"),
    ("quantize-unknown-mode", lambda c, t: ["--quantize", "int3"], "--quantize"),
    ("quantize-with-trt-target", lambda c, t: ["--quantize", "int4", "--target", "trt"], "--target onnx"),
    ("quantize-fp16-export", lambda c, t: ["--quantize", "int4", "--dtype", "fp16"], "fp32"),
    ("quantize-bad-block-size", lambda c, t: ["--quantize", "int4", "--block-size", "24"], "block-size"),
    ("quantize-unknown-algorithm", lambda c, t: ["--quantize", "int4", "--quant-algorithm", "gptq9"], "algorithm"),
    ("quantize-unknown-compute", lambda c, t: ["--quantize", "int4", "--quant-compute", "int2"], "--quant-compute"),
    ("deploy-unknown-kind", lambda c, t: ["--deploy", "k8s"], "--deploy"),
    ("deploy-torch-target", lambda c, t: ["--deploy", "genai", "--target", "torch"], "--target onnx"),
]


@pytest.mark.parametrize("case,args,fragment", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_bad_build_input(case, args, fragment, checkpoint, tmp_path):
    extra = args(checkpoint, tmp_path)
    base = {"--model": str(checkpoint), "--slice": "0.3", "--target": "onnx", "--nsamples": "4", "--seqlen": "32"}
    for i in range(0, len(extra), 2):
        base[extra[i]] = extra[i + 1]
    out = tmp_path / "out"
    result = run_cli("build", *[x for pair in base.items() for x in pair], "--no-bench", "--out", out)
    assert_one_error_line(result, fragment)
    assert not (out / "sliced").exists() and not (out / "onnx").exists()


def test_output_exists_and_is_not_a_build(checkpoint, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("build", "--model", checkpoint, "--out", out, *FAST)
    assert result.exit_code == 2 and "not a toolchain build" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_output_on_unwritable_path(checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("build", "--model", checkpoint, "--out", blocker / "sub", *FAST)
    assert result.exit_code == 2 and "--out" in result.output


def test_disk_full_leaves_nothing_half_written(checkpoint, tmp_path, monkeypatch):
    import errno

    from toolchain.model.modeling import SlicedForCausalLM

    def full(self, path, *args, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlicedForCausalLM, "save_pretrained", full)
    out = tmp_path / "full"
    result = run_cli("build", "--model", checkpoint, "--slice", "0.3", "--out", out, *FAST)
    assert result.exit_code == 2 and "no space left" in result.output.lower()
    assert not (out / "sliced").exists()
    assert not list(out.glob(".*tmp*"))
    assert manifest(out)["stages"]["compress"]["status"] == "failed"


def test_validate_rejects_corrupted_onnx(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"\x08\x07 this is not protobuf")
    result = run_cli("validate", export, export)
    assert_one_error_line(result, "model.onnx")


def test_inspect_rejects_non_build(tmp_path):
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_manifest_lists_stages_in_pipeline_order():
    """A stage enabled by a rerun (e.g. --quantize after a build that ran bench) is listed in its place."""
    from toolchain.app.pipeline import in_pipeline_order

    records = {"compress": 1, "export": 2, "bench": 3, "quantize": 4, "deploy": 5}
    assert list(in_pipeline_order(records)) == ["compress", "export", "quantize", "deploy", "bench"]
