"""The TensorRT bundle format, as both its writer (exporters.tensorrt) and its readers (the engine build,
runtime.trt_session) see it: file and directory names, the build command printed into every bundle,
trt_build.json, and the stored parity data.

Bundle layout: model.onnx (+ .data), trt_build.json, compat_report.json, parity/{inputs,expected}.npz
+ parity.json, and after the build on the target engine/{model.plan,engine.json,timing.cache}.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from toolchain.core.errors import ArtifactError

BUILD_CONFIG = "trt_build.json"
COMPAT_REPORT = "compat_report.json"
ENGINE_DIR, ENGINE_FILE, ENGINE_META = "engine", "model.plan", "engine.json"
# One timing cache for `build_engine` and the printed trtexec line, so either build reuses the other's
# tactic timings. TensorRT refuses a cache from another GPU or version (set_timing_cache returns False).
TIMING_CACHE = "timing.cache"
PARITY_DIR = "parity"
# The parity harness's default shapes (runtime/parity.make_inputs): batch 2, prompt 12, 3 decode steps.
PARITY_SHAPE = {"batch": 2, "prompt": 12, "pad": 3, "decode_steps": 3}
BUILD_COMMAND = "python -m exporters.tensorrt build"


def build_command(bundle: str | Path) -> str:
    return f"{BUILD_COMMAND} {shlex.quote(str(bundle))}"


def not_built_message(bundle: str | Path, reason: str) -> str:
    return f"TensorRT engine not built: {reason}; on the target GPU run: {build_command(bundle)}"


def read_build_config(bundle: str | Path) -> dict:
    path = Path(bundle).expanduser() / BUILD_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not a TensorRT bundle (no {BUILD_CONFIG}); write one with "
                            "`toolchain build --target trt` or exporters.tensorrt.write_bundle")
    return json.loads(path.read_text())


def load_parity_data(bundle: str | Path):
    """(ParityInputs, {step name: expected fp32 logits}) stored in a bundle."""
    from runtime.parity import ParityInputs

    folder = Path(bundle) / PARITY_DIR
    if not (folder / "inputs.npz").is_file() or not (folder / "expected.npz").is_file():
        raise ArtifactError(f"{folder} has no inputs.npz/expected.npz; rewrite the bundle with write_bundle")
    with np.load(folder / "inputs.npz") as data:
        inputs = ParityInputs(data["input_ids"], data["attention_mask"], data["decode_ids"], seed=0)
    with np.load(folder / "expected.npz") as data:
        expected = {name: data[name] for name in data.files}
    return inputs, expected
