"""Orthogonal rotations of the canonical model's residual stream (computational invariance).

Every residual position p has readers (linear layers fed by norm(h_p)) and writers (what adds into
h_p). Rotating position p by Q (D x d, orthonormal columns; d < D slices) means
  readers: W <- W Q        writers: W <- Qᵀ W, b <- Qᵀ b        embedding: E <- E Q
and the residual moves from p-1 to p through the shortcut Q_{p-1}ᵀ Q_p. The weightless norm
commutes with Q because it only divides by the vector's norm.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.model.modeling import ResidualNorm, SlicedForCausalLM
from toolchain.model.blocks import row_blocks


def _layer_and_kind(model: SlicedForCausalLM, position: int) -> tuple[int, str]:
    """Which layer reads `position`, and whether it is its attention ('attn'), MLP ('mlp') or both."""
    if model.config.parallel_block:
        return position, "both"
    return position // 2, ("attn" if position % 2 == 0 else "mlp")


def readers(model: SlicedForCausalLM, position: int) -> list[nn.Linear]:
    if position == model.config.num_positions:
        return [model.head_proj if model.head_proj is not None else model.lm_head]
    index, kind = _layer_and_kind(model, position)
    layer = model.layers[index]
    attn = [layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj]
    mlp = [m for m in (layer.mlp.up_proj, layer.mlp.gate_proj) if m is not None]
    return {"attn": attn, "mlp": mlp, "both": attn + mlp}[kind]


def writers(model: SlicedForCausalLM, position: int) -> list[nn.Module]:
    """Modules adding into residual `position` (embeddings for position 0)."""
    if position == 0:
        if model.embed_proj is not None:
            return [model.embed_proj]
        return [m for m in (model.embed_tokens, model.embed_positions) if m is not None]
    index, kind = _layer_and_kind(model, position - 1)
    layer = model.layers[index]
    return {"attn": [layer.attn.o_proj], "mlp": [layer.mlp.down_proj],
            "both": [layer.attn.o_proj, layer.mlp.down_proj]}[kind]


def norm_at(model: SlicedForCausalLM, position: int) -> ResidualNorm:
    if position == model.config.num_positions:
        return model.norm
    index, kind = _layer_and_kind(model, position)
    layer = model.layers[index]
    return layer.mlp_norm if kind == "mlp" else layer.attn_norm


def _set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype = module.weight.dtype
    module.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def times_basis(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """weight @ basis computed in float64 one row block at a time, returned in weight's dtype (each
    output row depends on its own input row only, so the blocks never hold more than one float64 block)."""
    basis = basis.to(device=weight.device, dtype=torch.float64)
    out = torch.empty(weight.shape[0], basis.shape[1], dtype=weight.dtype, device=weight.device)
    for rows in row_blocks(weight.shape[0], max(weight.shape[1], basis.shape[1])):
        out[rows] = (weight[rows].to(torch.float64) @ basis).to(weight.dtype)
    return out


def rotate_readers(model: SlicedForCausalLM, position: int, basis: torch.Tensor) -> None:
    for module in readers(model, position):
        _set_weight(module, times_basis(module.weight, basis))


def rotate_writers(model: SlicedForCausalLM, position: int, basis: torch.Tensor) -> None:
    retie = position == 0 and model.config.tie_word_embeddings and model.embed_proj is None
    if retie:  # the tied head reads the rotated table, so head_proj must write in its basis
        q = basis.to(model.head_proj.weight.device)
        _set_weight(model.head_proj, q.T @ model.head_proj.weight.to(basis.dtype))
    for module in writers(model, position):
        weight = module.weight.to(basis.dtype)
        q = basis.to(weight.device)
        if isinstance(module, nn.Embedding):  # V x D: row blocks
            del weight
            _set_weight(module, times_basis(module.weight, q))
            continue
        bias = None if module.bias is None else q.T @ module.bias.to(basis.dtype)
        _set_weight(module, q.T @ weight, bias)
    if retie:
        model.lm_head.weight = model.embed_tokens.weight
        model.lm_head.in_features = model.embed_tokens.embedding_dim


def add_embedding_projection(model: SlicedForCausalLM) -> None:
    """Keep the token table full width and rotate/slice through a D x d `embed_proj` instead."""
    config = model.config
    if model.embed_proj is not None:
        return
    table = model.embed_tokens.weight
    device = "cpu" if table.is_meta else table.device  # a streamed model's table is read later
    model.embed_proj = nn.Linear(table.shape[1], table.shape[1], bias=False, device=device, dtype=table.dtype)
    _set_weight(model.embed_proj, torch.eye(table.shape[1], dtype=table.dtype, device=device))
    config.embed_projection, config.embedding_width = True, table.shape[1]


def set_width(model: SlicedForCausalLM, position: int, width: int) -> None:
    """Record the residual width of `position` in the config and resize the norm that reads it."""
    config = model.config
    config.residual_widths[position] = width
    old = norm_at(model, position)
    new = ResidualNorm(width, config.hidden_size, config.norm_eps).to(old.weight.device)
    if position == config.num_positions:
        model.norm = new
        return
    index, kind = _layer_and_kind(model, position)
    setattr(model.layers[index], "mlp_norm" if kind == "mlp" else "attn_norm", new)


def set_shortcut(model: SlicedForCausalLM, position: int, matrix: torch.Tensor, dtype: torch.dtype) -> None:
    """Residual moves from `position` to `position + 1` as h @ matrix (matrix: d_p x d_{p+1})."""
    model.config.shortcuts[position] = True
    index, kind = _layer_and_kind(model, position)
    layer = model.layers[index]
    shortcut = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False, device=matrix.device, dtype=dtype)
    _set_weight(shortcut, matrix.T)
    setattr(layer, "mlp_shortcut" if kind == "mlp" else "attn_shortcut", shortcut)


def random_orthogonal(dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)  # sign fix: uniformly (Haar) distributed
