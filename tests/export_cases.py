"""Tiny models of every arch sliced at 0.3 and their ONNX exports, built once per test session.

Tracing (torch.export) is the slow step, so each arch is traced once and both dtypes are produced
from that trace through the same `export_onnx` pipeline (`traced=`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from exporters.onnx import ExportOptions, export_onnx, trace_onnx
from tiny_models import VOCAB, tiny_hf_model
from toolchain.model.adapters import to_canonical
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model

_SLICED: dict[str, torch.nn.Module] = {}
_EXPORTS: dict[tuple[str, str, bool], Path] = {}


def sliced_model(arch: str):
    if arch not in _SLICED:
        model = to_canonical(tiny_hf_model(arch)).eval()
        gen = torch.Generator().manual_seed(0)
        calib = torch.randint(3, VOCAB, (16, 24), generator=gen)
        _SLICED[arch] = slice_model(model, calib, torch.ones_like(calib), SliceOptions(slice=0.3))
    return _SLICED[arch]


def export_root(tmp_path_factory) -> Path:
    """One dir for the whole session, whichever test module asks first."""
    return tmp_path_factory.getbasetemp() / "onnx-exports"


def exported(arch: str, dtype: str, root: Path, optimize: bool | str = True) -> Path:
    """The export dir of `arch` sliced at 0.3 in `dtype` (optimize: ExportOptions.optimize)."""
    key = (arch, dtype, optimize)
    if key not in _EXPORTS:
        raw = root / arch / "traced.onnx"
        if not raw.exists():
            raw.parent.mkdir(parents=True, exist_ok=True)
            trace_onnx(sliced_model(arch), raw)
        suffix = {True: "", "fast": "", False: "-raw", "none": "-raw"}.get(optimize, f"-{optimize}")
        out = root / arch / f"{dtype}{suffix}"
        export_onnx(sliced_model(arch), out, ExportOptions(dtype=dtype, optimize=optimize), traced=raw)
        _EXPORTS[key] = out
    return _EXPORTS[key]


def build_dir(arch: str, root: Path) -> Path:
    """A build dir as `toolchain build` lays it out: sliced/ (torch model) and onnx/ (fp32 export)."""
    build = root / arch / "build"
    if not build.exists():
        sliced_model(arch).save_pretrained(build / "sliced")
        (build / "onnx").symlink_to(exported(arch, "fp32", root), target_is_directory=True)
    return build
