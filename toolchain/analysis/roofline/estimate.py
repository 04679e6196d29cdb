"""Roofline estimates: from a model's shapes alone (no weights), will the dense and the compressed
model fit on a GPU, and how fast can they be at best?

Every number is a bound or a plain estimate from shapes, bytes and datasheet peaks; nothing is run.
Parameters, weight bytes, KV-cache bytes and matmul FLOPs come from the size model
(toolchain/model/sizes), which predicts exactly the model `toolchain slice` writes for the same options.

Formulas (B = batch, T = prompt tokens = `context`, C = cached tokens, w = bytes per weight,
a = bytes per activation/KV element = 4 for fp32 else 2; H query heads, G KV heads,
hq/hv = per-layer query-key / value head dims, I = MLP width, V = vocab, D = residual width):

  weights    = parameters × w                (int8 = 1, int4 = 0.5 bytes; quantisation scales ignored)
  KV cache   = B · C · G · Σ_layers (hq + hv) · a    (SliceGPT leaves it as is; MoDeGPT shrinks hq, hv)
  workspace  = B · T · (2·D + max(H·hq + G·(hq+hv) + H·hv, k·I)) · a + B · V · 4
               (one layer's live activations during a prefill of T tokens, k = 3 gated / 2 plain MLP,
               attention by SDPA/flash so no T×T scores, plus fp32 logits of the last position)
  need       = weights + KV cache (C = context) + workspace + OVERHEAD_BYTES on one GPU; it fits if
               need ≤ USABLE_FRACTION × memory
  #GPUs      = ceil((weights + KV + workspace) / (USABLE_FRACTION × memory − OVERHEAD_BYTES))
  FLOPs      = 2 · B · T_new · (matmul weights but the head) + 2 · B · (head matmul weights)
               + Σ_layers 2 · B · H · (hq + hv) · (T_new·C + T_new·(T_new+1)/2)   (causal attention)
  bytes read = all weights except lookup-only tables (a lookup reads B rows; a tied table is read whole
               as the head) + KV read (decode: C = context) or written (prefill: T)
  time ≥ max(FLOPs / (n · peak · e_c), bytes / (n · bandwidth · e_b))
               n GPUs with ideal tensor parallelism (no communication cost); e_c = e_b = 1 unless
               calibrated with `fit_efficiency`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from toolchain.analysis.roofline.configs import model_shape
from toolchain.analysis.roofline.gpus import GiB, GPUSpec, select_gpus
from toolchain.core.errors import InvalidOptionError
from toolchain.model import sizes

USABLE_FRACTION = 0.90  # the driver, ECC and fragmentation leave ~10 % of the nominal memory unusable
OVERHEAD_BYTES = 1 * GiB  # per GPU: CUDA context (~0.3-0.5 GB) + cuBLAS/cuDNN workspaces + allocator slack
ROUND_TO = 8  # SliceGPT's default rounding of the sliced width
SCHEMA = "toolchain.plan/1"
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
WEIGHT_BYTES = {k: sizes.WEIGHT_BYTES[k] for k in DTYPES}
Layout = sizes.Decoder  # a model variant's shapes: the dense model, or the planned compressed one

check_slice = sizes.check_slice
slice_width = sizes.slice_width


def normalise_dtype(dtype: str) -> str:
    key = sizes.normalise_dtype(dtype)
    if key not in DTYPES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return key


def dense_layout(shape: sizes.Decoder) -> sizes.Decoder:
    return shape


def sliced_layout(shape: sizes.Decoder, fraction: float, slice_head: bool = False, tie: str = "slice",
                  share: str = "none", method: str = "slicegpt", compression: float = 0.25,
                  modegpt_multiple: int = 8) -> sizes.Decoder:
    """The canonical model `toolchain slice` writes with these options (see sizes.planned)."""
    if shape.fused:
        raise InvalidOptionError(f"{shape.name} is already sliced; plan it with --slice 0 or slice the original model")
    return sizes.planned(shape, sizes.CompressionPlan(method=method, slice=fraction, slice_head=slice_head, tie=tie,
                                                      share=share, compression=compression,
                                                      modegpt_multiple=modegpt_multiple))


def count_params(shape: sizes.Decoder, layout: sizes.Decoder | None = None) -> dict:
    """Parameters by group (embeddings, blocks, shortcuts, lm_head, total; a tied table once) plus
    what the costs read (tables, lookup, matmul, head_matmul)."""
    return sizes.parameters(layout or shape).as_dict()


def kv_cache_bytes(layout: sizes.Decoder, batch: int, tokens: int, dtype: str) -> int:
    return sizes.kv_cache_bytes(layout, batch, tokens, dtype)


def workspace_bytes(layout: sizes.Decoder, batch: int, tokens: int, dtype: str) -> int:
    width = max(layout.residual_widths)
    attn = max(layout.num_heads * (q + v) + layout.num_kv_heads * (q + v)
               for q, v in zip(layout.qk_head_dims, layout.v_head_dims))
    mlp = (3 if layout.gated_mlp else 2) * max(layout.intermediate_sizes)
    return batch * tokens * (2 * width + max(attn, mlp)) * sizes.activation_bytes(dtype) + batch * layout.vocab_size * 4


def phase_flops(layout: sizes.Decoder, params: dict, batch: int, new: int, past: int) -> float:
    """FLOPs of one forward over `new` tokens per sequence with `past` tokens cached; logits of the
    last position only."""
    pairs = new * past + new * (new + 1) / 2  # (query, key) pairs under the causal mask
    attn = sum(2 * batch * macs * pairs for macs in sizes.attention_macs(layout))
    body = params["matmul"] - params["head_matmul"]
    return 2 * batch * new * body + 2 * batch * params["head_matmul"] + attn


def weight_read_bytes(params: dict, dtype: str) -> int:
    """Weights one forward reads: all but the lookup-only tables."""
    return math.ceil((params["total"] - params["lookup"]) * WEIGHT_BYTES[dtype])


def phase_bytes(layout, params, dtype, batch: int, new: int, past: int, phase: str) -> int:
    """Bytes one forward moves: weights + KV read (`past` tokens) + KV written (prefill only; a decode
    step's own K/V row is left out as negligible)."""
    written = new if phase == "prefill" else 0
    return weight_read_bytes(params, dtype) + kv_cache_bytes(layout, batch, past + written, dtype)


@dataclass
class Efficiency:
    """Achieved fraction of peak: predicted time = ideal time / efficiency. 1.0 = the pure bound."""

    compute: float = 1.0
    bandwidth: float = 1.0
    gpu: str | None = None  # where it was measured
    prefill_samples: int = 0
    decode_samples: int = 0
    source: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Variant:
    """One model variant (dense or compressed) independent of the GPU."""

    name: str
    residual_width: int
    head_width: int
    params: dict[str, int]
    weight_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    prefill_flops: float
    prefill_bytes: int
    decode_flops: float
    decode_bytes: int

    @property
    def resident_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes


@dataclass
class Estimate:
    """One variant on one GPU type."""

    need_bytes: int  # on a single GPU, overhead included
    fits: bool
    n_gpus: int
    prefill_ms: float
    prefill_bound: str  # "compute" | "memory"
    prefill_tokens_per_s: float
    decode_ms: float
    decode_bound: str
    decode_tokens_per_s: float


@dataclass
class Plan:
    model: dict
    settings: dict
    variants: dict[str, Variant | None]
    gpus: list[dict]  # {"gpu": spec dict, "dense": Estimate, "sliced": Estimate | None, "ratios": {...}}
    calibration: Efficiency | None = None
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def conv(value):
            if hasattr(value, "__dataclass_fields__"):
                return {k: conv(v) for k, v in asdict(value).items()}
            if isinstance(value, dict):
                return {k: conv(v) for k, v in value.items()}
            if isinstance(value, list):
                return [conv(v) for v in value]
            return value

        dense, sliced = self.variants.get("dense"), self.variants.get("sliced")
        return {
            "schema": SCHEMA,
            "model": self.model,
            "settings": self.settings,
            "calibration": conv(self.calibration),
            "variants": {"dense": conv(dense), "sliced": conv(sliced)},
            "ratios": _variant_ratios(dense, sliced),
            "gpus": conv(self.gpus),
            "assumptions": list(self.assumptions),
        }


def _ratio(new, old) -> float | None:
    return None if new is None or old in (None, 0) else new / old


def _variant_ratios(dense: Variant | None, sliced: Variant | None) -> dict:
    if dense is None or sliced is None:
        return {"params": None, "weight_bytes": None, "decode_bytes": None, "prefill_flops": None}
    return {"params": _ratio(sliced.params["total"], dense.params["total"]),
            "weight_bytes": _ratio(sliced.weight_bytes, dense.weight_bytes),
            "decode_bytes": _ratio(sliced.decode_bytes, dense.decode_bytes),
            "prefill_flops": _ratio(sliced.prefill_flops, dense.prefill_flops)}


def make_variant(name: str, layout: sizes.Decoder, dtype: str, batch: int, context: int) -> Variant:
    params = count_params(layout)
    return Variant(
        name=name, residual_width=max(layout.residual_widths[:-1]), head_width=layout.residual_widths[-1],
        params=params, weight_bytes=math.ceil(params["total"] * WEIGHT_BYTES[dtype]),
        kv_cache_bytes=kv_cache_bytes(layout, batch, context, dtype),
        workspace_bytes=workspace_bytes(layout, batch, context, dtype),
        prefill_flops=phase_flops(layout, params, batch, context, 0),
        prefill_bytes=phase_bytes(layout, params, dtype, batch, context, 0, "prefill"),
        decode_flops=phase_flops(layout, params, batch, 1, context),
        decode_bytes=phase_bytes(layout, params, dtype, batch, 1, context, "decode"),
    )


def bound_seconds(flops: float, nbytes: float, gpu: GPUSpec, dtype: str, n_gpus: int = 1,
                  eff: Efficiency | None = None) -> tuple[float, str]:
    """max(compute time, memory time) on n GPUs with ideal tensor parallelism, and which one binds."""
    eff = eff or Efficiency()
    compute = flops / (n_gpus * gpu.peak_flops(dtype) * eff.compute)
    memory = nbytes / (n_gpus * gpu.bandwidth * eff.bandwidth)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def gpus_needed(resident_bytes: int, gpu: GPUSpec) -> int:
    per_gpu = USABLE_FRACTION * gpu.memory_bytes - OVERHEAD_BYTES
    return max(1, math.ceil(resident_bytes / per_gpu))


def estimate(variant: Variant, gpu: GPUSpec, dtype: str, batch: int, context: int,
             eff: Efficiency | None = None) -> Estimate:
    need = variant.resident_bytes + OVERHEAD_BYTES
    n = gpus_needed(variant.resident_bytes, gpu)
    prefill, prefill_bound = bound_seconds(variant.prefill_flops, variant.prefill_bytes, gpu, dtype, n, eff)
    decode, decode_bound = bound_seconds(variant.decode_flops, variant.decode_bytes, gpu, dtype, n, eff)
    return Estimate(need_bytes=need, fits=need <= USABLE_FRACTION * gpu.memory_bytes, n_gpus=n,
                    prefill_ms=prefill * 1e3, prefill_bound=prefill_bound,
                    prefill_tokens_per_s=batch * context / prefill,
                    decode_ms=decode * 1e3, decode_bound=decode_bound, decode_tokens_per_s=batch / decode)


ASSUMPTIONS = [
    f"usable memory = {USABLE_FRACTION:.0%} of nominal; {OVERHEAD_BYTES / GiB:.0f} GiB per GPU for the CUDA "
    "context, library workspaces and allocator slack",
    "parameters are those of the model `toolchain slice` writes with the same options (tied table counted once, "
    "shortcuts and head projections included); MoDeGPT assumes every layer loses the same fraction",
    "KV cache sized for the full context at batch B, in fp16/bf16 (fp32 for fp32); SliceGPT does not shrink it",
    "workspace = B·T·(2·D + max(attention projections, k·I))·a + B·V·4: one layer's activations in a prefill "
    "of T = context tokens (SDPA/flash attention, no T×T scores) plus fp32 logits of the last position",
    "times are lower bounds: max(FLOPs / peak, bytes / bandwidth) on the #GPUs shown with ideal tensor "
    "parallelism (no communication); pipeline parallelism would not divide per-token latency",
    "prefill = one forward over the whole context (logits for the last position only); decode = one token "
    "with the context cached, reading every weight but the lookup tables plus the whole KV cache",
    "int8/int4 = weight-only quantisation (matmuls in fp16); scales and zero points not counted",
    "peaks: dense fp16/bf16 tensor-core FLOP/s with fp32 accumulation (no sparsity), datasheet bandwidth",
]


def plan(config: Any, slice: float = 0.3, gpus: str | Iterable[str] | None = "all", batch: int = 1,
         context: int = 4096, dtype: str = "fp16", slice_head: bool = False,
         efficiency: Efficiency | None = None, tie: str = "slice", share: str = "none",
         method: str = "slicegpt", compression: float = 0.25, modegpt_multiple: int = 8) -> Plan:
    """Dense vs compressed memory fit and speed bounds on each GPU. The compressed variant is the model
    `toolchain slice` writes with the same options (defaults equal). For a canonical config (model_type
    sliced_decoder, already compressed), only the `sliced` variant is filled, as saved."""
    check_slice(slice)
    dtype = normalise_dtype(dtype)
    if int(batch) < 1 or int(context) < 1:
        raise InvalidOptionError(f"--batch and --context must be >= 1, got {batch} and {context}")
    batch, context = int(batch), int(context)
    specs = select_gpus(gpus)
    shape = model_shape(config)
    if shape.fused:
        dense, sliced = None, make_variant("sliced", shape, dtype, batch, context)
    else:
        dense = make_variant("dense", shape, dtype, batch, context)
        layout = sliced_layout(shape, slice, slice_head, tie, share, method, compression, modegpt_multiple)
        sliced = make_variant("sliced", layout, dtype, batch, context)
    rows = []
    for gpu in specs:
        row = {"gpu": gpu.as_dict(), "dense": None, "sliced": None}
        for variant in (dense, sliced):
            if variant is not None:
                row[variant.name] = estimate(variant, gpu, dtype, batch, context, efficiency)
        d, s = row["dense"], row["sliced"]
        row["ratios"] = {"n_gpus": _ratio(s and s.n_gpus, d and d.n_gpus),
                         "prefill_ms": _ratio(s and s.prefill_ms, d and d.prefill_ms),
                         "decode_ms": _ratio(s and s.decode_ms, d and d.decode_ms)}
        rows.append(row)
    model = {"name": shape.name, "arch": shape.arch, "hidden_size": shape.hidden_size,
             "num_layers": shape.num_layers, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
             "head_dim": shape.qk_head_dims[0], "intermediate_size": max(shape.intermediate_sizes),
             "vocab_size": shape.vocab_size, "gated_mlp": shape.gated_mlp, "parallel_block": shape.parallel_block,
             "tied_embeddings": shape.tied, "already_sliced": shape.fused}
    compressing = not shape.fused
    settings = {"method": method if compressing else None,
                "slice": slice if compressing and "slicegpt" in method else None,
                "compression": compression if compressing and "modegpt" in method else None,
                "slice_head": slice_head, "tie": tie, "share": share, "dtype": dtype,
                "batch": batch, "context": context, "usable_fraction": USABLE_FRACTION,
                "overhead_bytes": OVERHEAD_BYTES}
    return Plan(model=model, settings=settings, variants={"dense": dense, "sliced": sliced}, gpus=rows,
                calibration=efficiency, assumptions=list(ASSUMPTIONS))
