"""Fold orthogonal rotations of the residual streams into a canonical model (`--rotate`).

An exact reparametrisation, not a compression: with h'_p = h_p R_p at every residual position p,
  readers of p:  W <- W R_p             (they see norm(h_p R_p) = norm(h_p) R_p: the weightless
                                          RMSNorm only divides by ||h||, and ||h R|| = ||h||)
  writers of p:  W <- R_pᵀ W, b <- R_pᵀ b  (their output lands in the rotated basis)
  shortcut p→p+1: S <- R_pᵀ S R_{p+1}     (h'_p R_pᵀ S R_{p+1} = h_p S R_{p+1} = h'_{p+1})
so R_p Rᵀ_p = I cancels everywhere and the logits are unchanged. What changes is how each weight's
energy is spread over its rows and columns: a rotation with ±1/√n entries (Hadamard) or a random one
mixes every outlier channel into all channels, so per-block int4 scales fit the weights better.

One rotation per distinct residual width: positions joined without a shortcut have equal widths, so
they share it and need no new matrix (a dense or MoDeGPT model keeps no shortcut at all); existing
shortcuts absorb the change. The tie is kept through the same mechanism as SliceGPT's rotated table
(rotation.rotate_writers): the one token table becomes E R_0 and head_proj absorbs R_0 on its output
side. With `project_table` a tied table stays as it is and an `embed_proj` absorbs R_0 instead.

Optional per-head rotations of the values (`heads`): each KV head's value vectors v_g become v_g R_g
(v_proj's output rows of that head: R_gᵀ W, R_gᵀ b), attention averages them linearly, so every query
head h of the group outputs o_h R_g, and o_proj's input columns of head h take W <- W R_g.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from toolchain.compress import rotation
from toolchain.compress.hadamard import construction
from toolchain.model.modeling import SlicedForCausalLM


@dataclass
class Rotation:
    matrix: torch.Tensor  # n x n orthogonal, float64
    kind: str  # "hadamard" | "random"
    construction: str  # how the matrix was made

    def record(self) -> dict:
        return {"kind": self.kind, "construction": self.construction}


def make_rotation(width: int, mode: str, generator: torch.Generator) -> Rotation:
    """A seeded orthogonal `width` x `width` matrix: randomised Hadamard diag(s) H / √n where a
    construction exists (else a random one, recorded as such), or Haar-random for `random`. Each call
    draws from `generator`, so one seed and one call order give the same bytes."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    if mode == "hadamard" and (built := construction(width)) is not None:
        # random signs on the input channels before mixing: a fixed H maps some inputs onto a single
        # output channel; with random signs no particular input is likely to be one of them
        signs = torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        matrix = signs[:, None].to(torch.float64) * built.matrix().to(torch.float64) / math.sqrt(width)
        return Rotation(matrix, "hadamard", built.describe())
    if mode not in ("hadamard", "random"):
        raise ValueError(f"unknown rotation {mode!r}")
    note = "random orthogonal" if mode == "random" else f"random orthogonal (no Hadamard construction of order {width})"
    return Rotation(rotation.random_orthogonal(width, seed), "random", note)


def shortcut_module(model: SlicedForCausalLM, position: int) -> nn.Linear:
    index, kind = rotation._layer_and_kind(model, position)
    layer = model.layers[index]
    return layer.mlp_shortcut if kind == "mlp" else layer.attn_shortcut


def rotate_residual(model: SlicedForCausalLM, rotations: dict[int, torch.Tensor]) -> None:
    """Fold `rotations[width]` into every position of that width (see the module docstring)."""
    config = model.config
    widths, dtype = config.residual_widths, model.dtype
    for position, present in enumerate(config.shortcuts):
        if present:  # nn.Linear keeps S transposed: h @ S = h @ weightᵀ
            old = shortcut_module(model, position).weight.to(torch.float64).T
            new = rotations[widths[position]].T @ old @ rotations[widths[position + 1]]
            rotation.set_shortcut(model, position, new, dtype)
    for position in range(config.num_positions + 1):
        matrix = rotations[widths[position]]
        rotation.rotate_writers(model, position, matrix)
        rotation.rotate_readers(model, position, matrix)


def rotate_values(model: SlicedForCausalLM, mode: str, generator: torch.Generator) -> list[list[dict]]:
    """Per-KV-head rotations of v_proj's outputs and o_proj's inputs; the record of each."""
    records = []
    for layer in model.layers:
        attn = layer.attn
        groups = attn.heads // attn.kv_heads
        per_kv = [make_rotation(attn.v_dim, mode, generator) for _ in range(attn.kv_heads)]
        values = torch.block_diag(*(r.matrix for r in per_kv))
        outputs = torch.block_diag(*(per_kv[h // groups].matrix for h in range(attn.heads)))
        v = attn.v_proj
        bias = None if v.bias is None else values.T @ v.bias.to(torch.float64)
        rotation._set_weight(v, rotation.times_basis(v.weight.T, values).T, bias)  # Rᵀ W = (Wᵀ R)ᵀ
        rotation._set_weight(attn.o_proj, rotation.times_basis(attn.o_proj.weight, outputs))
        records.append([r.record() for r in per_kv])
    return records


@torch.no_grad()
def rotate_model(model: SlicedForCausalLM, mode: str, seed: int, heads: bool = False,
                 project_table: bool = False) -> dict:
    """Rotate `model` in place; returns what was done, for the compression report."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    rotations = {width: make_rotation(width, mode, generator) for width in sorted(set(config.residual_widths))}
    if project_table and config.tie_word_embeddings and model.embed_proj is None:
        rotation.add_embedding_projection(model)
    rotate_residual(model, {width: r.matrix for width, r in rotations.items()})
    record = {"mode": mode, "seed": seed, "residual": {str(w): r.record() for w, r in rotations.items()},
              "table": "embed_proj" if model.embed_proj is not None else "rotated", "heads": None}
    if heads:
        record["heads"] = rotate_values(model, mode, generator)
    config.compression = {**(config.compression or {}), "rotate": mode, "rotate_heads": heads}
    return record
