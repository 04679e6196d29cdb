"""Calibrated block weights for the int4 graph: GPTQ run on the canonical (sliced) model the export
was written from, on windows of the calibration text's train split.

GPTQ needs the torch model and activations, which the ONNX graph alone cannot give; so this reads the
build's canonical model dir (sliced/) and returns {canonical module name: BlockQuantized} for
quantize.py to write with exporters/nbits.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolchain.core.blockquant import BlockQuantized
from toolchain.core.errors import InvalidOptionError


@dataclass
class Calibration:
    model_dir: Path  # a canonical model dir (a build's sliced/)
    text: str = "ptb"  # calibration text (train split)
    nsamples: int = 32
    seqlen: int = 256

    def key(self) -> dict:
        return {"calib": self.text, "nsamples": self.nsamples, "seqlen": self.seqlen}


def gptq_weights(calibration: Calibration, block_size: int, wanted=lambda module: True, bits: int = 4,
                 progress=None) -> dict[str, BlockQuantized]:
    """GPTQ codes of the Linears of the canonical model at `calibration.model_dir` that `wanted(name)`
    selects (the others are not written at `bits`: no point solving for them)."""
    from runtime.loading import load_causal_lm
    from toolchain.compress import gptq
    from toolchain.data.sources import load_tokenizer
    from toolchain.data.text import load_text, token_windows

    model_dir = Path(calibration.model_dir)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        raise InvalidOptionError(f"--quant-algorithm gptq needs the canonical model the export came from; "
                                 f"{model_dir} is not a model dir (config.json + *.safetensors)")
    model, _ = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir)
    windows = token_windows(tokenizer, load_text(calibration.text, "train"), calibration.nsamples, calibration.seqlen)
    modules = [name for name in gptq.linear_names(model) if wanted(name)]
    return gptq.gptq_quantize(model, windows.input_ids, windows.attention_mask, block_size=block_size, bits=bits,
                              modules=modules, progress=progress)
