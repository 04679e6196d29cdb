"""The GPU table: capacities, bandwidths and datasheet peaks, and picking rows by name."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from toolchain.core.errors import InvalidOptionError

GiB = 1 << 30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # nominal capacity; NVIDIA's "GB" for GPU memory is GiB (a 4090 shows 24564 MiB)
    bandwidth: float  # bytes/s, decimal as in the datasheets
    fp16_flops: float  # dense fp16/bf16 tensor-core peak with fp32 accumulation, no 2:4 sparsity
    fp32_flops: float  # non-tensor fp32 peak (PyTorch does not use TF32 for matmuls by default)
    source: str
    aliases: tuple[str, ...] = ()

    def peak_flops(self, dtype: str) -> float:
        # int8/int4 here are weight-only formats: the matmuls still run in fp16
        return self.fp32_flops if dtype == "fp32" else self.fp16_flops

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("aliases")
        return out


_T = 1e12
GPU_SPECS: tuple[GPUSpec, ...] = (
    GPUSpec("rtx4090-24gb", 24 * GiB, 1008e9, 165.2 * _T, 82.6 * _T,
            "NVIDIA Ada Lovelace GPU Architecture whitepaper, Appendix A (GeForce RTX 4090): 24 GB GDDR6X, "
            "1008 GB/s, FP16/BF16 tensor 165.2 TFLOPS with FP32 accumulate (330.3 with FP16 accumulate), "
            "FP32 82.6 TFLOPS",
            ("rtx4090", "4090", "geforcertx4090", "nvidiageforcertx4090")),
    GPUSpec("rtx3090-24gb", 24 * GiB, 936e9, 71 * _T, 35.6 * _T,
            "NVIDIA Ampere GA102 GPU Architecture whitepaper, Table 9 (GeForce RTX 3090): 24 GB GDDR6X, "
            "936 GB/s, FP16/BF16 tensor 71 TFLOPS with FP32 accumulate (142 with FP16 accumulate), "
            "FP32 35.6 TFLOPS",
            ("rtx3090", "3090", "geforcertx3090", "nvidiageforcertx3090")),
    GPUSpec("a100-40gb", 40 * GiB, 1555e9, 312 * _T, 19.5 * _T,
            "NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM column: HBM2 1,555 GB/s, "
            "FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), FP32 19.5 TFLOPS",
            ("a100sxm440gb", "nvidiaa100sxm440gb", "a10040gbsxm")),
    GPUSpec("a100-80gb", 80 * GiB, 2039e9, 312 * _T, 19.5 * _T,
            "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: HBM2e 2,039 GB/s, "
            "FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), FP32 19.5 TFLOPS",
            ("a100sxm480gb", "nvidiaa100sxm480gb", "a10080gbsxm")),
    GPUSpec("h100-80gb", 80 * GiB, 3.35e12, 989.5 * _T, 67 * _T,
            "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 80 GB HBM3, 3.35 TB/s, "
            "FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989.5 dense, FP32 67 TFLOPS",
            ("h100", "h100sxm", "h100sxm580gb", "nvidiah10080gbhbm3")),
    GPUSpec("h200-141gb", 141 * GiB, 4.8e12, 989.5 * _T, 67 * _T,
            "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 141 GB HBM3e, 4.8 TB/s, "
            "FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989.5 dense, FP32 67 TFLOPS",
            ("h200", "h200sxm", "nvidiah200")),
)
GPUS: dict[str, GPUSpec] = {spec.name: spec for spec in GPU_SPECS}


def _norm_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def get_gpu(name: str | Mapping) -> GPUSpec:
    """A GPU by table name, alias or torch.cuda.get_device_name() text; a dict defines a custom one."""
    if isinstance(name, Mapping):
        try:
            return GPUSpec(name=str(name["name"]), memory_bytes=int(name["memory_bytes"]),
                           bandwidth=float(name["bandwidth"]), fp16_flops=float(name["fp16_flops"]),
                           fp32_flops=float(name.get("fp32_flops", name["fp16_flops"])),
                           source=str(name.get("source", "user supplied")))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidOptionError(
                f"a custom GPU needs name, memory_bytes, bandwidth (bytes/s) and fp16_flops; got {dict(name)}") from err
    key = _norm_name(str(name))
    for spec in GPU_SPECS:
        if key == _norm_name(spec.name) or key in spec.aliases:
            return spec
    raise InvalidOptionError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} or 'all'")


def select_gpus(names: str | Iterable[str] | None) -> list[GPUSpec]:
    """'all' / None -> every row; otherwise a comma-separated string or a list of names."""
    if names is None or (isinstance(names, str) and names.strip().lower() in ("", "all")):
        return list(GPU_SPECS)
    items = names.split(",") if isinstance(names, str) else list(names)
    return [get_gpu(item.strip()) for item in items if str(item).strip()]


