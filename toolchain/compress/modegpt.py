"""MoDeGPT (arXiv 2408.09632): compress *inside* each block by reconstructing module outputs.

A block is split into three modules, each a pair of matrices joined by a hidden dimension that
can shrink without touching the residual stream:

  type I   MLP      x -> σ(x) -> W_down          Nyström: keep k channels (ridge leverage scores of
                                                C_σ), refit W_down by least squares
  type II  Q/K      x -> (W_q, W_k) -> qᵀk        CR: keep the head dims (whole RoPE pairs) with the
                                                largest ‖C^½ W_q[:,j]‖·‖C^½ W_k[:,j]‖
  type III V/O      x -> W_v -> W_o              SVD of C^½ W_v W_o per head, rank r

Calibration runs layer by layer: the inputs of layer l come out of the already-compressed layers
0..l-1, and inside a layer the MLP is calibrated on the output of the compressed attention.
Correlations are token means, accumulated in float64, padding excluded.

Budget. `compression` c is the fraction of block parameters (attention + MLP) removed. Layer l gets
sparsity s_l ∝ softmax(−BI_l/ε), BI_l = 1 − E[cos(x_in, x_out)] measured on the dense model, scaled
so the parameter-weighted mean is c and water-filled into [0, max_sparsity]. Inside a layer every
module type loses the same fraction s_l of its own parameters (its hidden dim shrinks by s_l), so the
types share the layer's removal in proportion to their parameter counts.
The kept dims are then rounded to multiples of `multiple` (8 by default: GPU kernels want them, and
q/k and v keep one head size for ORT's GroupQueryAttention) and the total corrected back to c, by the
size model's rule (toolchain/model/sizes/modegpt.py), so `plan` predicts the same dims.

GQA. K and V are shared by the q heads of a group. Q/K: a KV head and its q heads keep one index
set, scored with the q norms summed over the group. V/O: one SVD per KV head of
C^½ W_v,g [W_o,h1 | … | W_o,hG] (the group's output blocks side by side), which minimises the sum
over the group of the per-head reconstruction errors; the left factor becomes the group's shared
W_v (and v bias), the column blocks of the right factor each q head's W_o.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolchain.core.errors import InvalidOptionError
from toolchain.model import sizes
from toolchain.model.finite import require_finite_statistics
from toolchain.model.modeling import SlicedForCausalLM, _carry, attention_bias
from toolchain.compress.rotation import _set_weight
from toolchain.compress.options import ModegptOptions, SliceOptions
from toolchain.compress.slicegpt import slice_model


# ---------------------------------------------------------------------------------------------
# Linear algebra (float64, no model knowledge)


def _ridge(corr: torch.Tensor, factor: float) -> float:
    """factor × mean diagonal; 1 when the correlation is zero (dead inputs: any ridge is harmless)."""
    scale = corr.diagonal().mean().item()
    return factor * scale if scale > 0 else 1.0


def damped(corr: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(len(corr), dtype=corr.dtype, device=corr.device)
    return corr + _ridge(corr, damping) * eye


def sqrt_and_inverse_sqrt(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^½ and C^-½ of a (damped, so positive definite) symmetric matrix, via one eigh."""
    values, vectors = torch.linalg.eigh(corr)
    floor = values.abs().max().clamp(min=1e-300) * 1e-15  # rounding can leave tiny negatives
    values = values.clamp(min=floor)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def ridge_leverage_scores(corr: torch.Tensor, ridge: float) -> torch.Tensor:
    """ℓ_i = [C (C + λI)⁻¹]_ii, λ = ridge × mean diag(C). Channels that carry energy in directions no
    other channel covers score high; duplicated or dead channels score low."""
    lam = _ridge(corr, ridge)
    eye = torch.eye(len(corr), dtype=corr.dtype, device=corr.device)
    return torch.linalg.solve(corr + lam * eye, corr).diagonal()  # C symmetric: (C+λI)⁻¹C has the same diagonal


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original layout)."""
    return torch.sort(torch.topk(scores, k).indices).values


def nystrom_down(w_down: torch.Tensor, corr: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """Least-squares down projection over the kept channels S (Nyström):

        argmin_W' Σ_t ‖W σ_t − W' σ_t[S]‖²  =  W C[:, S] (C[S, S] + λI)⁻¹

    w_down: (out, inner) as stored by nn.Linear; returns (out, k).
    """
    block = corr[kept][:, kept]
    rhs = corr[:, kept]
    return torch.linalg.solve(damped(block, damping), (w_down @ rhs).T).T


def nystrom_error(w_down: torch.Tensor, corr: torch.Tensor, kept: torch.Tensor, new_down: torch.Tensor) -> float:
    """Relative output error E‖Wσ − W'σ_S‖² / E‖Wσ‖², from the correlation alone."""
    total = torch.trace(w_down @ corr @ w_down.T)
    cross = torch.trace(new_down @ corr[kept] @ w_down.T)
    kept_energy = torch.trace(new_down @ corr[kept][:, kept] @ new_down.T)
    return float((total - 2 * cross + kept_energy) / total.clamp(min=1e-300))


@dataclass
class LowRank:
    left: torch.Tensor  # (in, r)
    right: torch.Tensor  # (r, out)
    discarded: float  # Σ_{i>r} σ_i² of C^½ M
    total: float  # Σ_i σ_i²


def low_rank_factors(m: torch.Tensor, root: torch.Tensor, inverse_root: torch.Tensor, rank: int) -> LowRank:
    """Best rank-r M ≈ A B in the data metric ‖C^½ (M − A B)‖_F (= ‖X M − X A B‖_F when C = XᵀX):
    with C^½ M = U Σ Vᵀ, A = C^-½ U_r Σ_r^½ and B = Σ_r^½ V_rᵀ. The error is exactly the discarded
    energy Σ_{i>r} σ_i² (Eckart–Young). Σ is split evenly so neither factor carries all the scale
    (fp16 export)."""
    u, s, vh = torch.linalg.svd(root @ m, full_matrices=False)
    rank = min(rank, len(s))
    half = s[:rank].sqrt()
    energy = s.square()
    return LowRank(left=inverse_root @ (u[:, :rank] * half), right=half[:, None] * vh[:rank],
                   discarded=float(energy[rank:].sum()), total=float(energy.sum()))


def split_rope_budget(pair_scores: torch.Tensor, pass_scores: torch.Tensor, dims: int) -> tuple[int, int]:
    """How many RoPE pairs and non-rotary dims each head keeps so that 2·pairs + passes = dims (the
    count is shared by all heads of a layer); the split that keeps the largest total score wins.
    pair_scores: (heads, rot/2), pass_scores: (heads, head_dim − rot)."""
    n_pairs, n_pass = pair_scores.shape[1], pass_scores.shape[1]
    best_pairs = torch.sort(pair_scores, dim=1, descending=True).values.sum(0).cumsum(0)
    best_pass = torch.sort(pass_scores, dim=1, descending=True).values.sum(0).cumsum(0)
    best, choice = -math.inf, None
    for pairs in range(min(n_pairs, 1), n_pairs + 1):  # keep ≥ 1 pair: a head keeps some position signal
        passes = dims - 2 * pairs
        if not 0 <= passes <= n_pass:
            continue
        kept = (best_pairs[pairs - 1] if pairs else 0.0) + (best_pass[passes - 1] if passes else 0.0)
        if float(kept) > best:
            best, choice = float(kept), (pairs, passes)
    if choice is None:
        raise ValueError(f"cannot keep {dims} dims from {n_pairs} pairs and {n_pass} non-rotary dims")
    return choice


def kept_qk_dims(scores: torch.Tensor, rot: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CR column choice per head, keeping RoPE pairs whole.

    scores: (heads, head_dim) per-dim scores; dims j and j + rot/2 (j < rot/2) form a pair under the
    rotate_half layout, dims ≥ rot are scored alone. Returns (index, pairs): index (heads, dims) the
    kept dims laid out as [pair firsts | pair seconds | non-rotary], so the reduced head has the
    rotate_half layout again; pairs (heads, n) the kept pair positions (< rot/2)."""
    half = rot // 2
    pair_scores = scores[:, :half] + scores[:, half:rot]
    pass_scores = scores[:, rot:]
    n_pairs, n_pass = split_rope_budget(pair_scores, pass_scores, dims)
    rows, pairs = [], []
    for head in range(len(scores)):
        kept_pairs = top_indices(pair_scores[head], n_pairs)
        kept_pass = top_indices(pass_scores[head], n_pass) + rot
        rows.append(torch.cat((kept_pairs, kept_pairs + half, kept_pass)))
        pairs.append(kept_pairs)
    return torch.stack(rows), torch.stack(pairs)


def layer_sparsities(influence: list[float], params: list[int], target: float, temperature: float = 0.1,
                     max_sparsity: float = 0.8) -> list[float]:
    """s_l = α·softmax(−BI_l/ε)_l with α such that Σ p_l s_l = target · Σ p_l, then water-filled:
    layers that would exceed max_sparsity are pinned there and the rest rescaled. Monotone: a more
    influential layer never gets a larger sparsity."""
    if not 0.0 <= target <= max_sparsity:
        raise InvalidOptionError(
            f"--compression must be in [0, {max_sparsity}] (the per-layer cap), got {target}; e.g. 0.3")
    if not temperature > 0:
        raise InvalidOptionError(f"temperature must be > 0 (math.inf for uniform), got {temperature}")
    bi = torch.tensor(influence, dtype=torch.float64)
    p = torch.tensor(params, dtype=torch.float64)
    weights = torch.exp(-(bi - bi.min()) / temperature) if math.isfinite(temperature) else torch.ones_like(bi)
    budget = target * p.sum()
    pinned = torch.zeros_like(bi, dtype=torch.bool)
    sparsity = torch.zeros_like(bi)
    for _ in range(len(bi) + 1):
        free = ~pinned
        rest = budget - (max_sparsity * p[pinned]).sum()
        sparsity = torch.where(pinned, torch.tensor(max_sparsity, dtype=torch.float64),
                               weights * rest / (p[free] * weights[free]).sum().clamp(min=1e-300))
        over = free & (sparsity > max_sparsity)
        if not over.any():
            break
        pinned |= over
    return [float(s) for s in sparsity.clamp(0.0, max_sparsity)]


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Calibration:
    masks: list[torch.Tensor]
    ropes: list
    biases: list[torch.Tensor]

    def tokens(self) -> int:
        return int(sum(m.sum() for m in self.masks))


def embed_calibration(model: SlicedForCausalLM, input_ids, attention_mask, batch_size: int, device):
    """Residuals at position 0 plus the per-batch masks, RoPE tables and attention biases."""
    dtype, config = model.dtype, model.config
    residuals, calibration = [], Calibration([], [], [])
    for module in (model.embed_tokens, model.embed_positions, model.rotary):
        if module is not None:
            module.to(device)
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        mask = attention_mask[start:start + batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        residuals.append(model.hidden_input(ids, positions))
        calibration.masks.append(mask)
        calibration.ropes.append(model.rope(positions, dtype))
        calibration.biases.append(attention_bias(mask, ids.shape[1], dtype, config.sliding_window))
    return residuals, calibration


def correlation(batches, masks, with_ones: bool = False) -> torch.Tensor:
    """E[x xᵀ] over the non-padding tokens (float64); with_ones appends a constant 1 to x so biases
    are reconstructed along with the weights."""
    total, count = None, 0
    for x, mask in zip(batches, masks):
        tokens = x[mask.bool()].to(torch.float64)
        if with_ones:
            tokens = torch.cat((tokens, torch.ones(len(tokens), 1, dtype=tokens.dtype, device=tokens.device)), 1)
        part = tokens.T @ tokens
        total = part if total is None else total + part
        count += len(tokens)
    require_finite_statistics(total, "a block's module inputs", batches if isinstance(batches, list) else None, masks)
    return total / max(count, 1)


def mlp_hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    """σ(x): the MLP's intermediate activation, act(gate)·up or act(up)."""
    up = mlp.up_proj(x)
    return mlp.act(mlp.gate_proj(x)) * up if mlp.gate_proj is not None else mlp.act(up)


def _carry_through(layer, h):
    """The residual path of a whole layer (shortcuts only), for comparing input and output."""
    h = _carry(layer.attn_shortcut, h)
    return h if layer.parallel else _carry(layer.mlp_shortcut, h)


@torch.no_grad()
def block_influence(model: SlicedForCausalLM, residuals, calibration: Calibration) -> list[float]:
    """BI_l = 1 − E_tokens[cos(x_in, x_out)] of every layer, on the model as it is now (dense)."""
    influence = []
    for layer in model.layers:
        layer.to(residuals[0].device)
        total, count, outputs = 0.0, 0, []
        for h, mask, rope, bias in zip(residuals, calibration.masks, calibration.ropes, calibration.biases):
            out = layer(h, rope, bias, None)
            cos = F.cosine_similarity(_carry_through(layer, h).double(), out.double(), dim=-1)[mask.bool()]
            total, count = total + float(cos.sum()), count + len(cos)
            outputs.append(out)
        influence.append(1.0 - total / max(count, 1))
        residuals = outputs
        layer.to("cpu")
    return influence


# ---------------------------------------------------------------------------------------------
# Module surgery


def _rows(linear, index: torch.Tensor):
    bias = None if linear.bias is None else linear.bias[index]
    return linear.weight[index], bias


@torch.no_grad()
def compress_mlp(model: SlicedForCausalLM, layer: int, corr: torch.Tensor, keep: int, options: ModegptOptions) -> dict:
    """Type I: keep `keep` intermediate channels by ridge leverage score, Nyström-refit the down
    projection (its bias is unchanged)."""
    mlp, config = model.layers[layer].mlp, model.config
    inner = mlp.down_proj.in_features
    if keep >= inner:
        return {"intermediate": inner, "mlp_error": 0.0}
    kept = top_indices(ridge_leverage_scores(corr, options.ridge), keep).to(mlp.down_proj.weight.device)
    w_down = mlp.down_proj.weight.to(torch.float64)
    new_down = nystrom_down(w_down, corr, kept, options.damping)
    error = nystrom_error(w_down, corr, kept, new_down)
    for linear in (mlp.up_proj, mlp.gate_proj):
        if linear is not None:
            _set_weight(linear, *_rows(linear, kept))
    _set_weight(mlp.down_proj, new_down)
    config.intermediate_sizes[layer] = keep
    return {"intermediate": keep, "mlp_error": error}


def _with_bias(linear) -> torch.Tensor:
    """Rows [W | b] in float64, matching a correlation built with_ones when the layer has biases."""
    weight = linear.weight.to(torch.float64)
    return weight if linear.bias is None else torch.cat((weight, linear.bias.to(torch.float64)[:, None]), 1)


def _column_norms(linear, corr) -> torch.Tensor:
    """‖C^½ w_j‖ for every output dim j: sqrt(w_j C w_jᵀ) (no square root of C needed)."""
    w = _with_bias(linear)
    return ((w @ corr) * w).sum(1).clamp(min=0).sqrt()


@torch.no_grad()
def compress_qk(model: SlicedForCausalLM, layer: int, corr: torch.Tensor, keep: int) -> dict:
    """Type II: per KV head keep the `keep` q/k dims with the largest ‖C^½ W_q[:,j]‖·‖C^½ W_k[:,j]‖
    (q norms summed over the group), RoPE pairs whole; the kept pairs' frequencies go to
    config.rope_pair_index so the reduced heads still rotate by their own angles."""
    attn, config = model.layers[layer].attn, model.config
    heads, kv, dim = attn.heads, attn.kv_heads, attn.qk_dim
    if keep >= dim:
        return {"qk_dim": dim, "qk_score_kept": 1.0}
    rot = config.qk_rotary_dim(layer) if config.position_embedding == "rope" else 0
    group = heads // kv
    q_norms = _column_norms(attn.q_proj, corr).view(kv, group, dim).sum(1)
    scores = q_norms * _column_norms(attn.k_proj, corr).view(kv, dim)
    index, pairs = kept_qk_dims(scores, rot, keep)
    kept_score = float(scores.gather(1, index).sum() / scores.sum().clamp(min=1e-300))
    index = index.to(attn.q_proj.weight.device)
    k_rows = (index + dim * torch.arange(kv, device=index.device)[:, None]).flatten()
    q_rows = (index.repeat_interleave(group, 0) + dim * torch.arange(heads, device=index.device)[:, None]).flatten()
    _set_weight(attn.q_proj, *_rows(attn.q_proj, q_rows))
    _set_weight(attn.k_proj, *_rows(attn.k_proj, k_rows))
    config.qk_head_dims[layer] = attn.qk_dim = keep
    _set_rope_pairs(attn, config, layer, pairs, rot)
    return {"qk_dim": keep, "qk_score_kept": kept_score}


def _set_rope_pairs(attn, config, layer: int, pairs: torch.Tensor, rot: int) -> None:
    """Compose the kept pair positions with the frequencies those positions had; None when nothing
    changed (every pair of the original rotary dim, in order)."""
    if rot == 0:
        return
    old = config.rope_pair_index[layer] or [list(range(rot // 2))] * len(pairs)
    new = [[old[head][p] for p in kept.tolist()] for head, kept in enumerate(pairs)]
    if all(row == list(range(config.rotary_dim // 2)) for row in new):
        new = None
    config.rope_pair_index[layer] = new
    buffer = None if new is None else torch.tensor(new, dtype=torch.long, device=attn.q_proj.weight.device)
    attn.register_buffer("rope_pairs", buffer, persistent=False)


@torch.no_grad()
def compress_vo(model: SlicedForCausalLM, layer: int, corr: torch.Tensor, rank: int, damping: float) -> dict:
    """Type III: per KV head g, rank-r SVD of C^½ W_v,g [W_o,h for h in g] (see the module docstring
    for GQA); V's bias, if any, is reconstructed through the correlation's constant column."""
    attn, config = model.layers[layer].attn, model.config
    heads, kv, dim = attn.heads, attn.kv_heads, attn.v_dim
    if rank >= dim:
        return {"v_dim": dim, "vo_error": 0.0}
    group, out = heads // kv, attn.o_proj.out_features
    root, inverse_root = sqrt_and_inverse_sqrt(damped(corr, damping))
    w_v = _with_bias(attn.v_proj)  # (kv·dim, in[+1])
    w_o = attn.o_proj.weight.to(torch.float64)  # (out, heads·dim)
    v_rows, o_cols, discarded, total = [], [None] * heads, 0.0, 0.0
    for g in range(kv):
        m_v = w_v[g * dim:(g + 1) * dim].T  # (in[+1], dim)
        m_o = torch.cat([w_o[:, h * dim:(h + 1) * dim].T for h in range(g * group, (g + 1) * group)], 1)
        factors = low_rank_factors(m_v @ m_o, root, inverse_root, rank)
        v_rows.append(factors.left.T)
        for i, h in enumerate(range(g * group, (g + 1) * group)):
            o_cols[h] = factors.right[:, i * out:(i + 1) * out].T
        discarded, total = discarded + factors.discarded, total + factors.total
    v = torch.cat(v_rows)
    if attn.v_proj.bias is None:
        _set_weight(attn.v_proj, v)
    else:
        _set_weight(attn.v_proj, v[:, :-1], v[:, -1])
    _set_weight(attn.o_proj, torch.cat(o_cols, 1))
    config.v_head_dims[layer] = attn.v_dim = rank
    return {"v_dim": rank, "vo_error": discarded / max(total, 1e-300)}


def block_parameters(model, layer: int) -> int:
    """Attention + MLP parameters of `layer`, from the config (the compress_* steps keep it current)."""
    return sizes.block_parameters(sizes.describe(model.config), layer)


def block_parameters_total(model) -> int:
    decoder = sizes.describe(model.config)
    return sum(sizes.block_parameters(decoder, layer) for layer in range(decoder.num_layers))


# ---------------------------------------------------------------------------------------------
# The method


def resolve_sparsities(model, residuals, calibration, options: ModegptOptions) -> tuple[list[float], list[float]]:
    """Per-layer sparsity (and the block influences it came from, empty when given explicitly)."""
    layers = model.config.num_hidden_layers
    if options.layer_sparsity is not None:
        given = [float(s) for s in options.layer_sparsity]
        if len(given) != layers or any(not 0.0 <= s < 1.0 for s in given):
            raise InvalidOptionError(f"layer_sparsity needs {layers} values in [0, 1), got {given}")
        return given, []
    if options.compression == 0.0:
        return [0.0] * layers, []
    influence = block_influence(model, residuals, calibration)
    params = [block_parameters(model, layer) for layer in range(len(model.layers))]
    return layer_sparsities(influence, params, options.compression, options.temperature,
                            options.max_sparsity), influence


def compress_layer(model, index: int, residuals, calibration: Calibration, kept: sizes.Decoder,
                   options: ModegptOptions) -> tuple[list[torch.Tensor], dict]:
    """Compress attention, then the MLP on the compressed attention's output, to the dims `kept`
    gives layer `index`; return the layer's outputs on the calibration data. Only one extra copy of
    the activations is held at a time (σ, the widest, is streamed into its correlation)."""
    layer = model.layers[index]
    extras = list(zip(calibration.ropes, calibration.biases))
    corr = correlation((layer.attn_norm(h) for h in residuals), calibration.masks,
                       with_ones=layer.attn.q_proj.bias is not None)
    stats = compress_qk(model, index, corr, kept.qk_head_dims[index])
    stats |= compress_vo(model, index, corr, kept.v_head_dims[index], options.damping)
    if layer.parallel:  # the MLP reads the same normed input as the attention
        mids, norm = residuals, layer.attn_norm
    else:
        mids = [_carry(layer.attn_shortcut, h) + layer.attn(layer.attn_norm(h), r, b, None)
                for h, (r, b) in zip(residuals, extras)]
        norm = layer.mlp_norm
    c_sigma = correlation((mlp_hidden(layer.mlp, norm(m)) for m in mids), calibration.masks)
    stats |= compress_mlp(model, index, c_sigma, kept.intermediate_sizes[index], options)
    if layer.parallel:
        return [layer(h, r, b, None) for h, (r, b) in zip(residuals, extras)], stats
    return [_carry(layer.mlp_shortcut, m) + layer.mlp(norm(m)) for m in mids], stats


@torch.no_grad()
def modegpt_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  options: ModegptOptions, progress=None) -> SlicedForCausalLM:
    """Compress `model` in place with MoDeGPT. `input_ids`/`attention_mask`: calibration windows [n, seq].
    Works on dense and on SliceGPT-sliced models (per-layer widths, shortcuts). `progress(done, total, note)`
    is called after each layer."""
    device, config = torch.device(options.device), model.config
    options.validate()
    model.eval()
    before = block_parameters_total(model)
    residuals, calibration = embed_calibration(model, input_ids, attention_mask, options.batch_size, device)
    sparsities, influence = resolve_sparsities(model, residuals, calibration, options)
    # every layer's kept dims up front, by the size model's rule: the rounding to multiples corrects
    # the total over all layers, and `plan` predicts the same dims
    kept = sizes.modegpt_dims(sizes.describe(config), sparsities, options.multiple)
    layers = []
    for index in range(config.num_hidden_layers):
        model.layers[index].to(device)
        residuals, stats = compress_layer(model, index, residuals, calibration, kept, options)
        layers.append({"sparsity": sparsities[index], **stats})
        model.layers[index].to("cpu")
        if progress is not None:
            progress(index + 1, config.num_hidden_layers, f"MoDeGPT layer {index + 1}/{config.num_hidden_layers}")
    model.to("cpu")
    record = {
        "method": "modegpt", "compression": options.compression,
        "achieved": 1.0 - block_parameters_total(model) / before,
        "temperature": options.temperature if math.isfinite(options.temperature) else "inf",
        "max_sparsity": options.max_sparsity, "damping": options.damping, "ridge": options.ridge,
        "multiple": options.multiple,
        "block_influence": influence, "layers": layers,
        "calibration_windows": int(len(input_ids)), "calibration_seqlen": int(input_ids.shape[1]), **options.extra,
    }
    previous = config.compression
    if previous:  # e.g. SliceGPT first: keep its record, name the chain
        record = {"method": f"{previous.get('method')}+modegpt", previous.get("method", "previous"): previous,
                  "modegpt": record}
    config.compression = record
    return model


def slicegpt_modegpt_model(model: SlicedForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           slice_options: SliceOptions, options: ModegptOptions, progress=None) -> SlicedForCausalLM:
    """`slicegpt+modegpt`: SliceGPT rotates and slices the residual stream, then MoDeGPT shrinks the
    blocks' inner dims of the sliced model (its `compression` counts the sliced block parameters)."""
    slice_model(model, input_ids, attention_mask, slice_options, progress)
    return modegpt_model(model, input_ids, attention_mask, options, progress)
