"""The canonical model: HF parity of the mapping, computational invariance, real slicing,
save/load and generation."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import ARCHS, VOCAB, batch_with_left_padding, logits, masked_max_diff, tiny_hf_model
from toolchain.model.adapters import to_canonical
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.model.modeling import count_parameters


def calibration(n=16, seq=24, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[::4, :5] = 0  # some padding, which the PCA must ignore
    return ids, mask



@pytest.mark.parametrize("arch", ARCHS)
def test_canonical_matches_hf(arch):
    hf = tiny_hf_model(arch)
    ids, mask, pos = batch_with_left_padding()
    diff = masked_max_diff(logits(hf, ids, mask, pos), logits(to_canonical(hf), ids, mask, pos), mask)
    assert diff <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rotation", ["pca", "random"])
def test_rotation_without_slicing_is_invariant(arch, rotation):
    ids, mask, pos = batch_with_left_padding()
    cal_ids, cal_mask = calibration()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        dense = to_canonical(tiny_hf_model(arch), dtype=dtype)
        rotated = slice_model(copy.deepcopy(dense), cal_ids, cal_mask, SliceOptions(slice=0.0, rotation=rotation))
        assert all(rotated.config.shortcuts), "rotation must install shortcut matrices"
        assert masked_max_diff(logits(dense, ids, mask, pos), logits(rotated, ids, mask, pos), mask) <= tol


def expected_parameters(config, dense_config) -> int:
    """Parameter count of a sliced model from its widths, by formula (independent of the modules)."""
    w, hidden, vocab = config.residual_widths, dense_config.hidden_size, config.vocab_size
    heads, kv, hd, inner = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size
    total = vocab * w[0] + (vocab if config.lm_head_bias else 0)
    if config.tie_word_embeddings:  # one shared table; head_proj maps the final width onto it
        total += w[-1] * w[0]
    else:
        total += vocab * w[-1]
    if config.position_embedding == "learned":
        total += (config.max_position_embeddings + config.learned_position_offset) * w[0]
    total += sum(a * b for a, b, s in zip(w[:-1], w[1:], config.shortcuts) if s)
    for layer in range(config.num_hidden_layers):
        attn_in, mlp_in = config.layer_positions(layer)
        qkv_out = (heads + 2 * kv) * hd
        total += w[attn_in] * qkv_out + (qkv_out if config.qkv_bias else 0)
        total += heads * hd * w[attn_in + 1] + (w[attn_in + 1] if config.o_bias else 0)
        n_up = 2 if config.gated_mlp else 1
        total += n_up * (w[mlp_in] * inner + (inner if config.mlp_up_bias else 0))
        total += inner * w[mlp_in + 1] + (w[mlp_in + 1] if config.mlp_down_bias else 0)
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_slicing_really_shrinks(arch):
    dense = to_canonical(tiny_hf_model(arch))
    sliced = slice_model(copy.deepcopy(dense), *calibration(), SliceOptions(slice=0.3))
    width = int(0.7 * 64) // 8 * 8
    config = sliced.config
    assert config.residual_widths[:-1] == [width] * config.num_positions
    assert config.residual_widths[-1] == 64  # head stays full width by default
    for index, layer in enumerate(sliced.layers):
        assert layer.attn.q_proj.weight.shape[1] == layer.attn_norm.width == width
        last = index == config.num_hidden_layers - 1
        assert layer.mlp.down_proj.weight.shape[0] == (64 if last else width)
    assert sliced.embed_tokens.weight.shape == (VOCAB, width)
    if config.tie_word_embeddings:  # tied sources stay tied: one V x d table, a d x D head_proj
        assert sliced.lm_head.weight is sliced.embed_tokens.weight
        assert sliced.head_proj.weight.shape == (width, 64)
    else:
        assert sliced.lm_head.weight.shape == (VOCAB, 64)
    assert count_parameters(sliced).total == expected_parameters(config, dense.config)
    assert count_parameters(sliced).total < count_parameters(dense).total
    ids, mask, pos = batch_with_left_padding()
    assert masked_max_diff(logits(dense, ids, mask, pos), logits(sliced, ids, mask, pos), mask) > 1e-2


def test_explicit_widths_and_head_slicing():
    dense = to_canonical(tiny_hf_model("llama"))
    widths = [56, 48, 40, 32]
    sliced = slice_model(copy.deepcopy(dense), *calibration(), SliceOptions(widths=widths, slice_head=True))
    assert sliced.config.residual_widths == widths + [32]
    assert sliced.head_proj.weight.shape == (56, 32)  # tied: final width 32 → table width 56
    assert sliced.layers[1].mlp_shortcut.weight.shape == (32, 32)
    assert sliced.layers[0].mlp_shortcut.weight.shape == (40, 48)


def test_pca_ignores_padding():
    """Changing the token ids under padding must not change the sliced model."""
    ids, mask = calibration()
    other = ids.clone()
    other[~mask.bool()] = 7
    models = [slice_model(to_canonical(tiny_hf_model("llama")), x, mask, SliceOptions(slice=0.3)) for x in (ids, other)]
    assert torch.equal(models[0].layers[0].attn.q_proj.weight, models[1].layers[0].attn.q_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "opt", "phi", "phi3"])
def test_save_load_and_generate(arch, tmp_path):
    sliced = slice_model(to_canonical(tiny_hf_model(arch)), *calibration(), SliceOptions(slice=0.3))
    sliced.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "SlicedForCausalLM"
    ids, mask, pos = batch_with_left_padding(seq=8)
    assert torch.equal(logits(sliced, ids, mask, pos), logits(reloaded, ids, mask, pos))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    cached = sliced.generate(use_cache=True, **kwargs)
    uncached = sliced.generate(use_cache=False, **kwargs)
    after_reload = reloaded.generate(use_cache=True, **kwargs)
    assert cached.shape == (2, 28)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, after_reload)


def test_sliding_window_is_applied():
    """Mistral's window: a token further back than the window must not influence the logits."""
    dense = to_canonical(tiny_hf_model("mistral"))
    assert dense.config.sliding_window == 8
    ids = torch.randint(3, VOCAB, (1, 20))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, dense(input_ids=changed).logits
    # with 2 layers the receptive field is 2 windows; the last position sees back to 19-14=5 > 0
    assert torch.equal(a[0, -1], b[0, -1])
    assert not torch.equal(a[0, 1], b[0, 1])
