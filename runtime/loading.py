"""Load a causal LM for running or exporting: a saved canonical (sliced) model, an HF checkpoint dir,
or a hub id, resolved by `toolchain.data.sources` (safetensors only, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

from toolchain.core.errors import ArtifactError, ModelNotFoundError
from toolchain.model.modeling import SlicedForCausalLM


def load_causal_lm(spec: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, local checkpoint dir). Tokenizer files are optional here."""
    from transformers import AutoModelForCausalLM

    import toolchain.model  # noqa: F401  (registers the canonical model with the Auto classes)
    from toolchain.data.sources import resolve_model

    path = Path(spec).expanduser()
    if path.is_dir() and any(path.glob("*.onnx")) and not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} holds an ONNX model, not a torch checkpoint; pass the model dir it was "
                                 "exported from (with config.json and *.safetensors)")
    resolved = resolve_model(str(spec))
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ArtifactError(f"{resolved.path} could not be loaded as a causal LM ({err}); re-save the model "
                            "or pass a directory written by `toolchain build`/`save_pretrained`") from err
    return model.eval(), resolved.path


def to_canonical_model(model, source: str | None = None) -> SlicedForCausalLM:
    """The canonical model as is; any supported HF architecture mapped onto it (no slicing)."""
    if isinstance(model, SlicedForCausalLM):
        return model.eval()
    from toolchain.model.adapters import to_canonical

    return to_canonical(model, source_model=source, dtype=torch.float32).eval()
