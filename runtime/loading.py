"""Load a causal LM for running or exporting: a saved canonical (sliced) model, an HF checkpoint dir,
or a hub id. One path for each job: `toolchain.data.sources` resolves the name and loads the HF
weights (safetensors only, no remote code), `to_canonical_model` maps them onto the canonical model,
and `load_build_source` does both for the dense model a build was compressed from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from toolchain.core.build_dirs import model_dir
from toolchain.core.errors import ArtifactError, ModelNotFoundError, ToolchainError
from toolchain.model.modeling import SlicedForCausalLM


def load_causal_lm(spec: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, local checkpoint dir). Tokenizer files are optional here."""
    import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
    from toolchain.data.sources import load_hf_weights, resolve_model

    path = Path(spec).expanduser()
    if path.is_dir() and any(path.glob("*.onnx")) and not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} holds an ONNX model, not a torch checkpoint; pass the model dir it was "
                                 "exported from (with config.json and *.safetensors)")
    resolved = resolve_model(str(spec))
    return load_hf_weights(resolved, dtype), resolved.path


def to_canonical_model(model, source: str | None = None, keep_tie: bool = True) -> SlicedForCausalLM:
    """The canonical model as is; any supported HF architecture mapped onto it (no slicing)."""
    if isinstance(model, SlicedForCausalLM):
        return model.eval()
    from toolchain.model.adapters import to_canonical

    return to_canonical(model, source_model=source, dtype=torch.float32, keep_tie=keep_tie).eval()


def build_source(build: str | Path) -> tuple[str, bool]:
    """(the model a build was compressed from, whether its head stayed tied), from its model dir."""
    sliced = model_dir(build)
    report_path = sliced / "compression_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    options = report.get("options", {})
    source = options.get("model") or json.loads((sliced / "config.json").read_text()).get("source_model")
    if not source:
        raise ArtifactError(f"{build}/sliced names no source model (compression_report.json options.model or "
                            "config.json source_model); bench with --no-dense")
    return source, options.get("tie", "slice") != "untie"


def load_build_source(build: str | Path) -> SlicedForCausalLM:
    """The build's dense source model, mapped onto the canonical model the same way compress did."""
    source, keep_tie = build_source(build)
    try:
        model, _ = load_causal_lm(source)
    except ToolchainError as err:
        raise type(err)(f"dense source {source!r}: {err}; or bench the sliced model alone with --no-dense") from err
    return to_canonical_model(model, source, keep_tie)
