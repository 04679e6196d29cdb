"""GPTQ: error compensation beats round-to-nearest, codes are exactly MatMulNBits', padding never counts,
and the model comes back unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import VOCAB, WIDE, calibration_batch, tiny_hf_model
from toolchain.compress.gptq import gptq_quantize, linear_names
from toolchain.compress.gptq_solver import gptq_linear
from toolchain.compress.hessian import HessianAccumulator
from toolchain.core.blockquant import quantize_with, rtn_quantize
from toolchain.core.errors import InvalidOptionError
from toolchain.model.adapters import to_canonical


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated and unevenly scaled, as a linear layer sees them."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(rows, width, generator=gen) @ mixing + 0.1 * torch.randn(rows, width, generator=gen)


def output_error(x, weight, approx) -> float:
    return float(torch.linalg.norm(x @ (weight - approx).T))


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


@pytest.fixture(scope="module")
def single_linear():
    torch.manual_seed(0)
    x = correlated_inputs(1024, 100)  # K = 100: the last block of 32 is short
    weight = torch.randn(48, 100) * 0.1
    return x, weight


def test_gptq_beats_rtn_on_correlated_inputs(single_linear):
    x, weight = single_linear
    gptq = gptq_linear(weight, hessian_of(x), block_size=32, bits=4)
    rtn = rtn_quantize(weight.numpy(), 32, 4)
    assert gptq.codes.shape == (48, 100) and gptq.codes.dtype == np.uint8
    assert gptq.scales.shape == gptq.zero_points.shape == (48, 4)
    assert gptq.codes.max() <= 15 and gptq.zero_points.max() <= 15
    gptq_error = output_error(x, weight, torch.from_numpy(gptq.dequantize()))
    rtn_error = output_error(x, weight, torch.from_numpy(rtn.dequantize()))
    assert gptq_error < 0.7 * rtn_error


def test_codes_scales_and_zero_points_agree(single_linear):
    x, weight = single_linear
    gptq = gptq_linear(weight, hessian_of(x), block_size=32, bits=4)
    # the dequantized weights lie on their blocks' grids: re-rounding them gives back the same codes
    again = quantize_with(gptq.dequantize(), gptq.scales, gptq.zero_points, 32, 4)
    np.testing.assert_array_equal(again, gptq.codes)
    # every grid keeps 0 inside its range, as onnxruntime's min/max rule does
    assert (gptq.scales >= 0).all()


def test_eight_bits_stays_close_to_the_weights(single_linear):
    x, weight = single_linear
    gptq = gptq_linear(weight, hessian_of(x), block_size=32, bits=8)
    approx = torch.from_numpy(gptq.dequantize())
    assert gptq.codes.max() <= 255
    assert torch.linalg.norm(approx - weight) < 0.01 * torch.linalg.norm(weight)
    assert output_error(x, weight, approx) < 0.005 * float(torch.linalg.norm(x @ weight.T))


def test_dead_inputs_keep_their_weights(single_linear):
    x, weight = single_linear
    x = x.clone()
    x[:, 5] = 0  # an input channel calibration never excites
    gptq = gptq_linear(weight, hessian_of(x), block_size=32, bits=4)
    approx = gptq.dequantize()
    assert np.isfinite(approx).all()
    # rounded on its block's grid, not zeroed: within half a step of the weight
    assert np.all(np.abs(approx[:, 5] - weight[:, 5].numpy()) <= gptq.scales[:, 0] / 2 + 1e-6)


def test_padding_rows_add_nothing_to_the_hessian():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 16, generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    padded = HessianAccumulator(16)
    padded.add(x, mask)
    real = HessianAccumulator(16)
    real.add(torch.cat([x[0], x[1, 4:]]))
    assert padded.count == real.count == 16
    torch.testing.assert_close(padded.hessian(), real.hessian(), rtol=1e-6, atol=1e-9)


def tiny_canonical(arch: str = "llama"):
    return to_canonical(tiny_hf_model(arch, **WIDE))


def fake_quantized(model, quantized):
    """A copy of `model` with each quantized linear's weight replaced by its dequantized codes."""
    import copy

    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for name, blocks in quantized.items():
            copy_.get_submodule(name).weight.copy_(torch.from_numpy(blocks.dequantize()))
    return copy_


def logits_error(model, approx, ids, mask) -> float:
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = approx(input_ids=ids, attention_mask=mask).logits
    return float(torch.linalg.norm((ref - out)[mask.bool()]))


def text_like(n: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows with text's skew (Zipf-distributed ids over a fixed ranking), so a layer's inputs
    are correlated the way real activations are; uniform random ids make every Hessian nearly
    isotropic, where GPTQ has nothing to compensate with."""
    ranking = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0)) + 3
    weights = 1.0 / torch.arange(1, VOCAB - 2, dtype=torch.float64) ** 1.1
    draws = torch.multinomial(weights, n * seq, replacement=True, generator=torch.Generator().manual_seed(seed))
    return ranking[draws].view(n, seq), torch.ones(n, seq, dtype=torch.long)


def test_gptq_model_beats_rtn_and_leaves_the_model_unchanged():
    model = tiny_canonical("mistral")  # untied: every linear, head included, is its own weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = text_like(32, 32, seed=3)
    quantized = gptq_quantize(model, ids, mask, block_size=32, bits=4)
    assert list(quantized) == linear_names(model)
    assert "lm_head" in quantized and "layers.2.mlp.down_proj" in quantized
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    rtn = {name: rtn_quantize(model.get_submodule(name).weight.detach().numpy(), 32, 4) for name in quantized}
    test_ids, test_mask = text_like(8, 32, seed=11)  # held-out text of the same kind
    gptq_error = logits_error(model, fake_quantized(model, quantized), test_ids, test_mask)
    rtn_error = logits_error(model, fake_quantized(model, rtn), test_ids, test_mask)
    assert gptq_error < 0.85 * rtn_error


def test_tied_model_keeps_its_tie_and_weights():
    model = tiny_canonical("llama")  # tied: lm_head is the token table, read through head_proj
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = gptq_quantize(model, *calibration_batch(8, seq=16))
    assert {"head_proj", "lm_head"} <= set(quantized)
    assert model.lm_head.weight is model.embed_tokens.weight
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_layers_see_their_predecessors_dequantized():
    """Layer 1 is calibrated on what layer 0 outputs with its codes in place, i.e. GPTQ runs layer 0
    with exactly dequantize(codes) before moving on."""
    model = tiny_canonical()
    seen = []
    handle = model.layers[0].attn.q_proj.register_forward_pre_hook(
        lambda module, inputs: seen.append(module.weight.detach().clone()))
    ids, mask = calibration_batch(8, seq=16)
    quantized = gptq_quantize(model, ids, mask, block_size=32, bits=4, batch_size=8)
    handle.remove()
    assert len(seen) == 2  # one pass for the Hessians (original weights), one with the codes
    torch.testing.assert_close(seen[1], torch.from_numpy(quantized["layers.0.attn.q_proj"].dequantize()),
                               rtol=0, atol=0)
    assert not torch.equal(seen[0], seen[1])


def test_padded_tokens_do_not_count():
    """Changing the token ids under the padding changes nothing: their activations never enter H."""
    model = tiny_canonical()
    ids, mask = calibration_batch(8, seq=16)  # rows 0 and 4 are left-padded
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 17) % (VOCAB - 3) + 3
    first = gptq_quantize(model, ids, mask, modules=["layers.0.attn.q_proj", "layers.1.mlp.down_proj"])
    second = gptq_quantize(model, other, mask, modules=["layers.0.attn.q_proj", "layers.1.mlp.down_proj"])
    assert list(first) == ["layers.0.attn.q_proj", "layers.1.mlp.down_proj"]
    for name in first:
        np.testing.assert_array_equal(first[name].codes, second[name].codes)
        np.testing.assert_array_equal(first[name].scales, second[name].scales)


def test_unknown_modules_are_refused():
    model = tiny_canonical()
    ids, mask = calibration_batch(4, seq=8)
    with pytest.raises(InvalidOptionError, match="layers.0.attn.qkv"):
        gptq_quantize(model, ids, mask, modules=["layers.0.attn.qkv"])
