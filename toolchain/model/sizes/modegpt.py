"""MoDeGPT's kept inner dims per layer, read by the compressor and by the size model alike, so that
`plan` predicts exactly what `slice` writes for given per-layer sparsities.

Layer l keeps the fraction 1 − s_l of each inner dim: the q/k head dim, the v head dim and the MLP
intermediate size.

multiple m > 1: every kept dim is a multiple of m, and q/k and v keep one head dim. GPU attention and
GEMM kernels want multiples of 8, and ONNX Runtime's GroupQueryAttention takes one head size for q,
k and v. A head that is all RoPE keeps whole pairs, so its step is lcm(m, 2). Rounding every layer to
a multiple moves up to m/2 dims per layer and the errors need not cancel over the layers, so the
total is corrected afterwards: whole steps go to (or come from) the dims rounded furthest from their
ideal size, one step at a time, while that brings the kept block parameters closer to
Σ_l (1 − s_l)·p_l (p_l: layer l's block parameters before).

m = 1: each dim is rounded to the nearest unit (whole pairs for an all-RoPE head) and q/k and v
separately, with no correction (the rule from before multiples existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toolchain.model.sizes.counts import block_parameters
from toolchain.model.sizes.decoder import Decoder


def kept_dim(current: int, sparsity: float, step: int = 1) -> int:
    """Kept size of an inner dim losing `sparsity` of itself, in whole `step`s (RoPE pairs: 2)."""
    return max(step, int(round((1.0 - sparsity) * current / step)) * step)


def qk_step(model: Decoder, layer: int, multiple: int) -> int:
    """q/k dims move in whole RoPE pairs when the head is all RoPE (partial rotary: the non-rotary
    dims absorb an odd count)."""
    all_rotary = bool(model.rotary_dim) and model.rotary_dim == model.qk_head_dims[layer]
    return math.lcm(multiple, 2) if all_rotary else multiple


@dataclass
class _Dim:
    """One rounded dim of one layer: its head dim (q/k and v together) or its MLP intermediate size."""

    layer: int
    kind: str  # "head" | "inner"
    ideal: float  # (1 − s)·size before rounding
    kept: int
    step: int
    limit: int  # the size before compression

    def error(self) -> float:
        """Rounding error in steps: < 0 rounded down, > 0 rounded up."""
        return (self.kept - self.ideal) / self.step


def _apply(model: Decoder, dims: list[_Dim]) -> Decoder:
    qk, v, inner = list(model.qk_head_dims), list(model.v_head_dims), list(model.intermediate_sizes)
    for d in dims:
        if d.kind == "head":
            qk[d.layer] = min(model.qk_head_dims[d.layer], d.kept)
            v[d.layer] = min(model.v_head_dims[d.layer], d.kept)
        else:
            inner[d.layer] = d.kept
    return model.replace(qk_head_dims=tuple(qk), v_head_dims=tuple(v), intermediate_sizes=tuple(inner))


def _rounded_to_unit(model: Decoder, sparsities: list[float]) -> Decoder:
    qk, v, inner = [], [], []
    for layer, s in enumerate(sparsities):
        dim = model.qk_head_dims[layer]
        qk.append(min(dim, kept_dim(dim, s, qk_step(model, layer, 1))))
        v.append(min(model.v_head_dims[layer], kept_dim(model.v_head_dims[layer], s)))
        inner.append(min(model.intermediate_sizes[layer], kept_dim(model.intermediate_sizes[layer], s)))
    return model.replace(qk_head_dims=tuple(qk), v_head_dims=tuple(v), intermediate_sizes=tuple(inner))


def _rounded_to_multiple(model: Decoder, sparsities: list[float], multiple: int) -> list[_Dim]:
    dims = []
    for layer, s in enumerate(sparsities):
        head = max(model.qk_head_dims[layer], model.v_head_dims[layer])
        step = qk_step(model, layer, multiple)
        for kind, size, unit in (("head", head, step), ("inner", model.intermediate_sizes[layer], multiple)):
            kept = size if s <= 0 else min(size, kept_dim(size, s, unit))  # an untouched layer stays whole
            dims.append(_Dim(layer, kind, (1.0 - s) * size, kept, unit, size))
    return dims


def _blocks(model: Decoder) -> list[int]:
    return [block_parameters(model, layer) for layer in range(model.num_layers)]


def _correct_total(model: Decoder, sparsities: list[float], dims: list[_Dim]) -> list[_Dim]:
    """Move whole steps between the rounded dims until the kept block total is as close to the
    target as single steps get it (each step strictly shrinks the gap, so this ends)."""
    target = sum((1.0 - s) * p for s, p in zip(sparsities, _blocks(model)))
    blocks = _blocks(_apply(model, dims))
    while True:
        gap = target - sum(blocks)
        grow = gap > 0
        # the dims rounded furthest away from the direction the total must move go first
        order = sorted((d for d in dims if (d.kept < d.limit if grow else d.kept - d.step >= d.step)),
                       key=lambda d: d.error() if grow else -d.error())
        for d in order:
            before = d.kept
            d.kept = min(d.limit, d.kept + d.step) if grow else d.kept - d.step
            layer_blocks = block_parameters(_apply(model, dims), d.layer)
            if abs(gap - (layer_blocks - blocks[d.layer])) < abs(gap):
                blocks[d.layer] = layer_blocks
                break
            d.kept = before
        else:
            return dims


def modegpt_dims(model: Decoder, sparsities: list[float], multiple: int = 1) -> Decoder:
    """Per-layer q/k, v and MLP inner dims after MoDeGPT at these per-layer sparsities (module doc)."""
    if multiple <= 1:
        return _rounded_to_unit(model, sparsities)
    dims = _rounded_to_multiple(model, sparsities, multiple)
    return _apply(model, _correct_total(model, sparsities, dims))
