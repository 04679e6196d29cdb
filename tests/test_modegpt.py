"""MoDeGPT: the three module decompositions, the layer budget, and the compressed canonical model
(per-head RoPE pairs, reduced head dims) through save/load, generation and SliceGPT."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import (ARCHS, VOCAB, WIDE, batch_with_left_padding, calibration_batch, logits, masked_max_diff,
                         tiny_hf_model)
from toolchain.model.adapters import to_canonical
from toolchain.compress import modegpt as mg
from toolchain.compress.options import SliceOptions
from toolchain.core.errors import InvalidOptionError
from toolchain.model.modeling import count_parameters


def calibration():
    return calibration_batch(12)



def attention_input_correlation(model, layer=0):
    """E[x xᵀ] (with a constant column when q/k/v have biases) of `layer`'s attention input."""
    residuals, cal = mg.embed_calibration(model, *calibration(), batch_size=4, device="cpu")
    with torch.no_grad():
        for index in range(layer):
            residuals = [model.layers[index](h, r, b, None) for h, r, b in zip(residuals, cal.ropes, cal.biases)]
        xs = [model.layers[layer].attn_norm(h) for h in residuals]
    return mg.correlation(xs, cal.masks, with_ones=model.config.qkv_bias)


# --- identity at 0 % -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_zero_compression_leaves_the_model_unchanged(arch):
    dense = to_canonical(tiny_hf_model(arch))
    compressed = mg.modegpt_model(copy.deepcopy(dense), *calibration(), mg.ModegptOptions(compression=0.0))
    ids, mask, pos = batch_with_left_padding()
    assert masked_max_diff(logits(dense, ids, mask, pos), logits(compressed, ids, mask, pos), mask) <= 1e-6
    assert compressed.config.compression["method"] == "modegpt"
    assert compressed.config.rope_pair_index == [None] * compressed.config.num_hidden_layers


# --- type III: V/O by SVD ------------------------------------------------------------------------

def test_vo_svd_error_equals_discarded_energy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    m = torch.randn(12, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 20, generator=gen, dtype=torch.float64)
    corr = x.T @ x / len(x)
    root, inverse_root = mg.sqrt_and_inverse_sqrt(corr)
    errors = []
    for rank in range(1, 7):
        f = mg.low_rank_factors(m, root, inverse_root, rank)
        error = (x @ m - x @ f.left @ f.right).square().sum().item() / len(x)
        assert error == pytest.approx(f.discarded, rel=1e-8, abs=1e-10)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10  # rank(M) = 6: exact


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # GQA; qwen2 also has a v bias
def test_vo_is_exact_when_each_kv_head_has_low_rank(arch):
    """W_v,g of rank 5 per KV head ⇒ W_v,g [W_o,h …] has rank 5 ⇒ rank-5 V/O loses nothing."""
    model = to_canonical(tiny_hf_model(arch))
    attn = model.layers[0].attn
    with torch.no_grad():
        w = attn.v_proj.weight.view(attn.kv_heads, attn.v_dim, -1)
        u, s, vh = torch.linalg.svd(w)
        w.copy_(u[..., :5] @ torch.diag_embed(s[..., :5]) @ vh[..., :5, :])
        if attn.v_proj.bias is not None:  # a bias inside the rank-5 column space of the same head
            attn.v_proj.bias.copy_((u[..., :5] @ torch.randn(attn.kv_heads, 5, 1)).flatten())
    ids, mask, pos = batch_with_left_padding()
    before = logits(model, ids, mask, pos)
    stats = mg.compress_vo(model, 0, attention_input_correlation(model), rank=5, damping=0.01)
    assert attn.v_proj.weight.shape[0] == attn.kv_heads * 5 and model.config.v_head_dims[0] == 5
    assert stats["vo_error"] < 1e-10
    assert masked_max_diff(before, logits(model, ids, mask, pos), mask) <= 1e-4


# --- type I: MLP by Nyström ----------------------------------------------------------------------

def test_nystrom_with_leverage_scores_beats_random_channels():
    model = to_canonical(tiny_hf_model("llama"))
    residuals, cal = mg.embed_calibration(model, *calibration(), batch_size=4, device="cpu")
    layer = model.layers[0]
    with torch.no_grad():
        mids = [h + layer.attn(layer.attn_norm(h), r, b, None) for h, r, b in zip(residuals, cal.ropes, cal.biases)]
        corr = mg.correlation([mg.mlp_hidden(layer.mlp, layer.mlp_norm(h)) for h in mids], cal.masks)
    w = layer.mlp.down_proj.weight.detach().double()
    gen = torch.Generator().manual_seed(0)
    for keep in (24, 48, 72):
        chosen = mg.top_indices(mg.ridge_leverage_scores(corr, ridge=1.0), keep)
        ours = mg.nystrom_error(w, corr, chosen, mg.nystrom_down(w, corr, chosen, 0.01))
        randoms = []
        for _ in range(10):
            subset = torch.sort(torch.randperm(len(corr), generator=gen)[:keep]).values
            randoms.append(mg.nystrom_error(w, corr, subset, mg.nystrom_down(w, corr, subset, 0.01)))
        assert ours < min(randoms), (keep, ours, randoms)
    # the closed form is the least-squares optimum: refitting beats keeping W_down's own columns
    assert ours < mg.nystrom_error(w, corr, chosen, w[:, chosen])


def test_nystrom_is_exact_for_redundant_channels():
    """Channels that are linear combinations of kept ones are reconstructed exactly."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    sigma = torch.cat((base, base @ torch.randn(6, 4, generator=gen, dtype=torch.float64)), 1)
    corr = sigma.T @ sigma / len(sigma)
    w = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    kept = torch.arange(6)
    assert mg.nystrom_error(w, corr, kept, mg.nystrom_down(w, corr, kept, damping=1e-12)) < 1e-9


# --- type II: Q/K by CR with whole RoPE pairs ----------------------------------------------------

def test_cr_choice_keeps_whole_pairs():
    scores = torch.tensor([[9.0, 0.1, 0.2, 5.0, 9.0, 0.1, 0.3, 5.0, 4.0, 0.0],  # rot 8 (pairs j, j+4), 2 passes
                           [0.0, 3.0, 8.0, 0.1, 0.0, 3.0, 8.0, 0.2, 0.1, 7.0]])
    index, pairs = mg.kept_qk_dims(scores, rot=8, dims=5)
    assert pairs.tolist() == [[0, 3], [1, 2]]
    assert index.tolist() == [[0, 3, 4, 7, 8], [1, 2, 5, 6, 9]]
    for row, kept in zip(index.tolist(), pairs.tolist()):
        rotary = [d for d in row if d < 8]
        assert sorted(rotary) == sorted(kept + [p + 4 for p in kept])  # both halves of every pair


@pytest.mark.parametrize("arch,drop_pairs,drop_pass", [
    ("llama", [[1, 5, 6], [0, 2, 7]], None),  # GQA, full rotary, a different set per KV head
    ("llama3", [[3, 4, 7]], None),  # one KV head for four q heads, scaled RoPE
    ("phi", [[0], [3], [1], [2]], [[1, 5], [0, 7], [2, 3], [6, 4]]),  # partial rotary (rot 8 of 16)
    ("opt", None, [[0, 3, 9], [1, 2, 15], [4, 5, 6], [7, 8, 10]]),  # no RoPE: dims alone
])
def test_cr_drops_exactly_the_dims_that_carry_nothing(arch, drop_pairs, drop_pass):
    """Zero q's weights on some pairs/dims per KV head: CR must drop exactly those, and the reduced
    heads, rotating by their own kept frequencies, must give the same logits."""
    model = to_canonical(tiny_hf_model(arch))
    config, attn = model.config, model.layers[1].attn
    rot = config.rotary_dim if config.position_embedding == "rope" else 0
    group, half, dropped = attn.heads // attn.kv_heads, rot // 2, 0
    with torch.no_grad():
        q = attn.q_proj.weight.view(attn.heads, attn.qk_dim, -1)
        for g in range(attn.kv_heads):
            dims = [d for p in (drop_pairs[g] if drop_pairs else []) for d in (p, p + half)]
            dims += [rot + d for d in (drop_pass[g] if drop_pass else [])]
            q[g * group:(g + 1) * group, dims] = 0
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.view(attn.heads, attn.qk_dim)[g * group:(g + 1) * group, dims] = 0
            dropped = len(dims)
    ids, mask, pos = batch_with_left_padding()
    before = logits(model, ids, mask, pos)
    mg.compress_qk(model, 1, attention_input_correlation(model, layer=1), keep=attn.qk_dim - dropped)
    assert model.config.qk_head_dims[1] == attn.q_proj.weight.shape[0] // attn.heads == 16 - dropped
    if drop_pairs:
        expected = [sorted(set(range(half)) - set(d)) for d in drop_pairs]
        assert model.config.rope_pair_index[1] == expected
    assert masked_max_diff(before, logits(model, ids, mask, pos), mask) <= 1e-4


# --- layer budget --------------------------------------------------------------------------------

def test_layer_budget_averages_to_target_and_is_monotone():
    gen = torch.Generator().manual_seed(0)
    influence = torch.rand(12, generator=gen).tolist()
    params = torch.randint(1000, 5000, (12,), generator=gen).tolist()
    for target, temperature in ((0.3, 0.1), (0.5, 0.05), (0.2, 1.0), (0.4, math.inf)):
        s = mg.layer_sparsities(influence, params, target, temperature, max_sparsity=0.8)
        assert sum(p * x for p, x in zip(params, s)) / sum(params) == pytest.approx(target, abs=1e-9)
        assert all(0.0 <= x <= 0.8 + 1e-12 for x in s)
        order = sorted(range(12), key=lambda i: influence[i])
        assert all(s[a] >= s[b] - 1e-12 for a, b in zip(order, order[1:])), "more influence, less sparsity"
    assert max(mg.layer_sparsities(influence, params, 0.5, 0.05)) == pytest.approx(0.8)  # clipped, still averaging
    assert len(set(round(x, 12) for x in mg.layer_sparsities(influence, params, 0.4, math.inf))) == 1
    with pytest.raises(InvalidOptionError):
        mg.layer_sparsities(influence, params, 0.9, 0.1, max_sparsity=0.8)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_model_budget_hits_target_from_block_influence(arch):
    model = to_canonical(tiny_hf_model(arch))
    before = count_parameters(model).blocks
    mg.modegpt_model(model, *calibration(), mg.ModegptOptions(compression=0.3, temperature=1.0))
    record = model.config.compression
    bi, layers = record["block_influence"], record["layers"]
    assert len(bi) == 2 and all(0 < b < 2 for b in bi)
    assert (layers[0]["sparsity"] - layers[1]["sparsity"]) * (bi[1] - bi[0]) >= 0  # monotone
    assert 1 - count_parameters(model).blocks / before == pytest.approx(0.3, abs=0.03)
    assert record["achieved"] == pytest.approx(1 - count_parameters(model).blocks / before)


def test_invalid_compression_is_a_user_error():
    with pytest.raises(InvalidOptionError):
        mg.modegpt_model(to_canonical(tiny_hf_model("llama")), *calibration(), mg.ModegptOptions(compression=0.95))


# --- robustness ----------------------------------------------------------------------------------

def test_singular_correlations_stay_finite():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    for corr in (torch.zeros(8, 8, dtype=torch.float64), v @ v.T, torch.diag(torch.tensor([1e12] + [1e-20] * 7,
                                                                                          dtype=torch.float64))):
        w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
        kept = mg.top_indices(mg.ridge_leverage_scores(corr, 1.0), 3)
        assert torch.isfinite(mg.nystrom_down(w, corr, kept, 0.01)).all()
        root, inverse_root = mg.sqrt_and_inverse_sqrt(mg.damped(corr, 0.01))
        f = mg.low_rank_factors(torch.randn(8, 5, generator=gen, dtype=torch.float64), root, inverse_root, 2)
        assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all() and math.isfinite(f.discarded)


def test_dead_and_duplicated_channels_compress_without_nan():
    model = to_canonical(tiny_hf_model("llama"))
    with torch.no_grad():
        mlp = model.layers[0].mlp
        mlp.gate_proj.weight[:20] = 0  # dead: silu(0)·up = 0
        mlp.up_proj.weight[40:60] = mlp.up_proj.weight[20:40]  # duplicated
        mlp.gate_proj.weight[40:60] = mlp.gate_proj.weight[20:40]
        model.layers[0].attn.v_proj.weight[:16] = 0  # a KV head with no values
    mg.modegpt_model(model, *calibration(), mg.ModegptOptions(compression=0.5, temperature=math.inf))
    ids, mask, pos = batch_with_left_padding()
    assert torch.isfinite(logits(model, ids, mask, pos)).all()
    assert model.config.intermediate_sizes[0] < 96


# --- the compressed model as a product -----------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "phi"])  # GQA, biases, learned positions, partial
def test_save_reload_and_generate(arch, tmp_path):
    model = mg.modegpt_model(to_canonical(tiny_hf_model(arch)), *calibration(),
                             mg.ModegptOptions(compression=0.3, temperature=math.inf, multiple=1))
    config = model.config
    assert all(d < 16 for d in config.qk_head_dims + config.v_head_dims)
    assert all(i < 96 for i in config.intermediate_sizes)
    if config.position_embedding == "rope":
        assert all(p is not None for p in config.rope_pair_index)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_pair_index == config.rope_pair_index
    ids, mask, pos = batch_with_left_padding(seq=8)
    assert torch.equal(logits(model, ids, mask, pos), logits(reloaded, ids, mask, pos))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  pad_token_id=0)
    cached = model.generate(use_cache=True, **kwargs)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, model.generate(use_cache=False, **kwargs))
    assert torch.equal(cached, reloaded.generate(use_cache=True, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_slicegpt_then_modegpt(arch, tmp_path):
    model = mg.slicegpt_modegpt_model(to_canonical(tiny_hf_model(arch)), *calibration(), SliceOptions(slice=0.25),
                                      mg.ModegptOptions(compression=0.3, temperature=math.inf, multiple=1))
    config = model.config
    assert config.compression["method"] == "slicegpt+modegpt"
    assert config.compression["slicegpt"]["slice"] == 0.25 and config.compression["modegpt"]["compression"] == 0.3
    assert all(config.shortcuts) and config.residual_widths[0] == 48
    assert all(d < 16 for d in config.v_head_dims) and all(i < 96 for i in config.intermediate_sizes)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, pos = batch_with_left_padding(seq=8)
    out = logits(model, ids, mask, pos)
    assert torch.isfinite(out).all() and torch.equal(out, logits(reloaded, ids, mask, pos))


# --- ONNX export of reduced heads, multiple=1 (per-head RoPE gather, qk ≠ v head dims: traced graph) --

FAST_ONNX = ("llama", "phi", "opt")  # RoPE pairs under GQA, partial rotary, no RoPE; the rest with -m slow


@pytest.mark.parametrize("arch", [a if a in FAST_ONNX else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_onnx_export_matches_torch(arch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx_export = pytest.importorskip("exporters.onnx")
    from exporters.kv_wrapper import KVCacheWrapper, example_inputs
    from toolchain.core.iospec import input_names

    model = mg.modegpt_model(to_canonical(tiny_hf_model(arch)), *calibration(),
                             mg.ModegptOptions(compression=0.3, temperature=math.inf, multiple=1))
    assert model.config.qk_head_dims[0] < 16
    result = onnx_export.export_onnx(model, tmp_path / "onnx", onnx_export.ExportOptions(dtype="fp32"))
    inputs = list(example_inputs(model.config))
    inputs[1][1, :2] = 0  # a left-padded row
    with torch.no_grad():
        expected = KVCacheWrapper(model)(*inputs)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    names = input_names(model.config.num_hidden_layers)
    outputs = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == tuple(want.shape)
        assert abs(got - want.numpy()).max() <= 1e-4


# --- hardware-friendly dims (--modegpt-multiple) and the fused ONNX graph --------------------------

def _wide(arch: str):
    return to_canonical(tiny_hf_model(arch, **WIDE))  # head_dim 32, intermediate 192: room for multiples


@pytest.mark.parametrize("arch,multiple", [("llama", 8), ("phi", 8), ("qwen2", 4)])
def test_kept_dims_are_multiples_with_one_head_size(arch, multiple):
    """Every kept head dim and intermediate size is a multiple of the option, q/k and v share one head
    dim per layer, and the corrected total still lands on the target compression."""
    model = _wide(arch)
    before = count_parameters(model).blocks
    mg.modegpt_model(model, *calibration(), mg.ModegptOptions(compression=0.3, multiple=multiple))
    config = model.config
    assert config.qk_head_dims == config.v_head_dims
    assert all(d % multiple == 0 for d in config.qk_head_dims + config.intermediate_sizes)
    assert min(config.qk_head_dims) < 32 and min(config.intermediate_sizes) < 192  # really compressed
    # the total is off by less than one step of one dim (an MLP channel costs 3·128 parameters here)
    removed = 1 - count_parameters(model).blocks / before
    assert abs(removed - 0.3) * before < multiple * 3 * 128
    assert config.compression["multiple"] == multiple


def test_multiple_one_is_the_rounding_of_before():
    """multiple=1: each dim rounded to the nearest unit (whole pairs for all-RoPE q/k), q/k and v apart."""
    sparsities = [0.1, 0.37, 0.55]
    model = mg.modegpt_model(_wide("llama"), *calibration(),
                             mg.ModegptOptions(layer_sparsity=sparsities, multiple=1))
    config = model.config
    assert config.qk_head_dims == [2 * round((1 - s) * 16) for s in sparsities]
    assert config.v_head_dims == [round((1 - s) * 32) for s in sparsities]
    assert config.intermediate_sizes == [round((1 - s) * 192) for s in sparsities]
    assert config.qk_head_dims != config.v_head_dims


def _fast_export(model, tmp_path):
    from exporters.onnx import ExportOptions, export_onnx

    return export_onnx(model, tmp_path / "onnx", ExportOptions(dtype="fp32"))


@pytest.mark.parametrize("arch", ["llama", "phi", "opt"])  # GQA + RoPE pairs, partial rotary, no RoPE
def test_modegpt_exports_the_fused_graph(arch, tmp_path):
    """With multiples of 8 the export keeps the fast graph (no fallback) and passes its torch parity
    check; per-KV-head RoPE pairs included."""
    pytest.importorskip("onnxruntime")
    model = mg.modegpt_model(_wide(arch), *calibration(), mg.ModegptOptions(compression=0.3))
    if model.config.position_embedding == "rope":
        assert any(p is not None for p in model.config.rope_pair_index)
    graph = _fast_export(model, tmp_path).report["graph"]
    assert graph["kind"] == "fast" and graph["fallback_reason"] is None, graph["fallback_reason"]
    assert graph["parity"]["passed"]


def test_slicegpt_modegpt_exports_the_fused_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    model = mg.slicegpt_modegpt_model(_wide("llama"), *calibration(), SliceOptions(slice=0.25),
                                      mg.ModegptOptions(compression=0.3))
    graph = _fast_export(model, tmp_path).report["graph"]
    assert graph["kind"] == "fast" and graph["fallback_reason"] is None and graph["parity"]["passed"]


def test_multiple_one_still_exports_through_the_traced_graph(tmp_path):
    """Head dims like 11/12 cannot be one GroupQueryAttention head size: the traced graph, with the reason."""
    pytest.importorskip("onnxruntime")
    model = mg.modegpt_model(to_canonical(tiny_hf_model("llama")), *calibration(),
                             mg.ModegptOptions(compression=0.3, temperature=math.inf, multiple=1))
    graph = _fast_export(model, tmp_path).report["graph"]
    assert graph["kind"] == "basic" and "head dim" in graph["fallback_reason"]
