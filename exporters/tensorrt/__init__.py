"""TensorRT target: a portable bundle written anywhere, turned into an engine on the target GPU.

Engines only run on the GPU architecture and TensorRT version that built them, so `write_bundle`
produces everything the target needs, checked here:

  model.onnx + model.onnx.data   fp16 graph without ORT fusions (TensorRT cannot parse com.microsoft
                                 ops), constant-folded; norms, RoPE angles, softmax, logits stay fp32
  trt_build.json                 two optimisation profiles (prefill, decode), min/opt/max per input,
                                 precision, workspace, the build commands
  compat_report.json             static parser check (exporters/trt_ops.py)
  parity/                        inputs and torch-fp32 expected logits for `validate` on the target
  config.json, tokenizer files, export_config.json, README.md

`build_engine` (or `python -m exporters.tensorrt build <bundle>`) then parses the ONNX with
TensorRT's parser into a strongly typed network and writes engine/model.plan + engine/engine.json,
with the timing cache engine/timing.cache beside them (the name the printed trtexec line uses too).

Modules: profiles (optimisation profiles), bundle (write_bundle, trt_build.json, trtexec command),
readme (the bundle's README.md), engine (build on the target), cli (the `trt` commands). The bundle
format shared with runtime/trt_session.py lives in runtime/trt_bundle.py and runtime/trt_environment.py.

The names below resolve on first use: `toolchain --help` imports exporters.tensorrt.cli through this
package, and must not pay for torch and onnx, which the bundle writer imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "exporters.tensorrt.bundle": ("BundleResult", "DEFAULT_MAX_CONTEXT", "DEFAULT_WORKSPACE_GB", "check_bundle",
                                  "fold_constants", "trtexec_command", "write_bundle"),
    "exporters.tensorrt.engine": ("EngineOutcome", "EngineResult", "build_engine", "build_engine_if_available"),
    "exporters.tensorrt.profiles": ("ProfileRange", "covering_profile", "default_profiles", "profile_shapes"),
    "exporters.trt_ops": ("IncompatibleGraphError",),
    "runtime.trt_bundle": ("BUILD_COMMAND", "BUILD_CONFIG", "COMPAT_REPORT", "ENGINE_DIR", "ENGINE_FILE",
                           "ENGINE_META", "PARITY_DIR", "PARITY_SHAPE", "build_command", "load_parity_data",
                           "not_built_message", "read_build_config"),
    "runtime.trt_environment": ("TrtEnvironment", "probe_environment", "trt_available"),
    "toolchain.core.iospec": ("step_shapes",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
