"""Inputs that must stop a run early: non-finite weights or statistics, and a second build racing the
first on one directory. Each gives one `error:` line, exit code 2, and writes nothing."""

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
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tiny_models import VOCAB, save_tiny_checkpoint, tiny_hf_model
from toolchain.app.cli import app
from toolchain.compress.slicegpt.statistics import covariance
from toolchain.core.errors import NonFiniteError
from toolchain.core.fileio import LOCK_FILE

FAST = ["--nsamples", "4", "--seqlen", "32"]


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, fragment: str) -> str:
    lines = [line for line in result.output.splitlines()
             if line.strip() and "Loading weights" not in line and not line.startswith("> ")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], result.output
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def edited_checkpoint(checkpoint: Path, tmp_path: Path, edit) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(checkpoint, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def one_nan(tensors):
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")


@pytest.mark.parametrize("mode", [[], ["--no-stream"], ["--method", "modegpt"]], ids=["streamed", "in-memory", "modegpt"])
def test_a_nan_source_weight_is_refused(mode, checkpoint, tmp_path):
    source = edited_checkpoint(checkpoint, tmp_path, one_nan)
    out = tmp_path / "out"
    result = run_cli("slice", "--model", source, "--slice", "0.3", *FAST, *mode, "--out", out)
    line = one_error_line(result, "model.layers.1.self_attn.q_proj.weight")
    assert "1 NaN/Inf" in line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_calibration_that_overflows_is_refused(checkpoint, tmp_path):
    """Finite weights whose activations overflow float32 (an Inf in the residual stream)."""
    def overflow(tensors):
        tensors["model.layers.0.self_attn.o_proj.weight"].fill_(3e38)

    source = edited_checkpoint(checkpoint, tmp_path, overflow)
    out = tmp_path / "out"
    line = one_error_line(run_cli("slice", "--model", source, "--slice", "0.3", *FAST, "--out", out),
                          "calibration statistics of ")
    assert "are not finite" in line and "calibrate in float32" in line
    assert not out.exists()


def test_covariance_names_the_first_bad_batch():
    good, bad = torch.ones(2, 4, 8), torch.ones(2, 4, 8)
    bad[1, 2, 3] = float("inf")
    masks = [torch.ones(2, 4)] * 3
    assert torch.isfinite(covariance([good, good], masks[:2])).all()
    with pytest.raises(NonFiniteError, match="calibration batch 1 is the first"):
        covariance([good, bad, good], masks, "residual position 4")


def test_export_refuses_a_model_with_nan(tmp_path):
    from exporters.onnx import ExportOptions, export_onnx
    from toolchain.model.adapters import to_canonical

    model = to_canonical(tiny_hf_model("llama"))
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="layers.1.mlp.down_proj.weight has 1 NaN/Inf"):
        export_onnx(model, tmp_path / "onnx", ExportOptions())
    assert not (tmp_path / "onnx").exists()


def test_a_second_build_on_the_same_dir_fails_at_once(checkpoint, tmp_path):
    out = tmp_path / "build"
    command = [sys.executable, "-m", "toolchain.app.cli", "build", "--model", str(checkpoint), "--slice", "0.3",
               "--target", "onnx", "--no-bench", "--quiet", "--out", str(out), *FAST]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "manifest.json").exists():  # the first build holds the lock and has started
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        started = time.perf_counter()
        result = run_cli("build", "--model", checkpoint, "--slice", "0.2", "--target", "onnx", "--no-bench",
                         "--out", out, *FAST)
        assert time.perf_counter() - started < 5, "the second build must fail at once, not wait"
        one_error_line(result, f"in use by another build (pid {first.pid})")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert [s["status"] for s in stages.values()] == ["done"] * 3
    report = json.loads((out / "sliced" / "compression_report.json").read_text())
    assert report["options"]["slice"] == 0.3  # the first build's, untouched by the second


def test_a_lock_left_by_a_killed_build_does_not_block(checkpoint, tmp_path):
    out = tmp_path / "build"
    command = [sys.executable, "-m", "toolchain.app.cli", "build", "--model", str(checkpoint), "--slice", "0.3",
               "--target", "torch", "--out", str(out), *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).read_text().strip() == str(proc.pid)  # the file stays; its lock died with it
    result = run_cli(*command[3:], "--json")
    assert result.exit_code == 0, result.output
    assert (out / "sliced" / "model.safetensors").is_file()
