"""Issue 12: tie-preserving slicing, shared rotations, width budgets and honest size accounting."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import ARCHS, VOCAB, batch_with_left_padding, calibration_batch, tiny_hf_model
from toolchain.model.adapters import to_canonical
from toolchain.compress.budget import NotSmallerError
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.core.errors import ToolchainError
from toolchain.model.modeling import count_parameters

TIED = [a for a in ARCHS if to_canonical(tiny_hf_model(a)).config.tie_word_embeddings]
SEQUENTIAL = [a for a in ARCHS if not to_canonical(tiny_hf_model(a)).config.parallel_block]
HUGE = 10**9  # a target every model meets at full width


def calibration():
    return calibration_batch(16)


def max_diff(a, b):
    ids, mask, pos = batch_with_left_padding()
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        lb = b(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return (la - lb)[mask.bool()].abs().max().item()


def sliced(arch, **options):
    dense = to_canonical(tiny_hf_model(arch))
    return dense, slice_model(copy.deepcopy(dense), *calibration(), SliceOptions(**options))


def independent_count(config) -> int:
    """Parameters of a sliced canonical model from its config alone (tied table counted once)."""
    w, hidden, vocab = config.residual_widths, config.hidden_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    rows = vocab + (config.max_position_embeddings + config.learned_position_offset
                    if config.position_embedding == "learned" else 0)
    table = config.embedding_width if config.embed_projection else w[0]
    total = rows * table + (table * w[0] if config.embed_projection else 0)
    if config.tie_word_embeddings:
        total += table * w[-1] if config.head_projection else 0
    else:
        total += vocab * w[-1]
    total += vocab if config.lm_head_bias else 0
    total += sum(a * b for a, b, s in zip(w[:-1], w[1:], config.shortcuts) if s)
    for layer in range(config.num_hidden_layers):
        a, m = config.layer_positions(layer)
        hd, inner = config.head_dim, config.intermediate_size
        qkv = (heads + 2 * kv) * hd
        total += (w[a] + config.qkv_bias) * qkv + heads * hd * w[a + 1] + config.o_bias * w[a + 1]
        ups = 2 if config.gated_mlp else 1
        total += ups * (w[m] + config.mlp_up_bias) * inner + inner * w[m + 1] + config.mlp_down_bias * w[m + 1]
    return total


# ---- the tie survives ----

@pytest.mark.parametrize("arch", TIED)
def test_tie_survives_slicing_and_reload(arch, tmp_path):
    _, model = sliced(arch, slice=0.25, share="layer", slice_head=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.shape == (VOCAB, 48)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
    assert max_diff(model, reloaded) == 0.0
    assert count_parameters(reloaded).total == independent_count(reloaded.config)


# ---- invariance at slice 0 for every new mode, every arch where it applies ----

MODES = {
    "tie-joint": dict(tie_basis="joint"),
    "tie-first": dict(tie_basis="first"),
    "share-layer": dict(share="layer"),
    "share-all": dict(share="all"),
    "share-all-head": dict(share="all", slice_head=True),
    "budget-global": dict(target_params=HUGE, budget="global", share="layer"),
    "budget-variance": dict(target_params=HUGE, budget="variance"),
}


def mode_applies(mode: str, arch: str) -> bool:
    if mode.startswith("tie"):
        return arch in TIED
    return mode != "share-layer" or arch in SEQUENTIAL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_new_modes_are_invariant_at_slice_0(arch, mode):
    if not mode_applies(mode, arch):
        pytest.skip(f"{mode} does not apply to {arch}")
    dense, rotated = sliced(arch, slice=0.0, **MODES[mode])
    assert rotated.config.residual_widths == [64] * (rotated.config.num_positions + 1)
    assert max_diff(dense, rotated) <= 1e-5


# ---- shared rotations remove the shortcuts inside a group ----

def test_shared_rotation_removes_within_group_shortcuts():
    _, none = sliced("llama", slice=0.25)
    _, layer = sliced("llama", slice=0.25, share="layer")
    _, everything = sliced("llama", slice=0.25, share="all", slice_head=True)
    assert none.config.shortcuts == [True, True, True, True]
    assert layer.config.shortcuts == [False, True, False, True]  # attn -> MLP carries as is
    assert layer.layers[0].attn_shortcut is None and layer.layers[0].mlp_shortcut is not None
    assert everything.config.shortcuts == [False] * 4
    assert count_parameters(everything).shortcuts == 0
    assert count_parameters(layer).shortcuts < count_parameters(none).shortcuts


# ---- budgets meet the target, counted independently ----

@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"tie": "project"}), ("opt", {}), ("phi", {}),
                                        ("qwen2", {"share": "layer", "slice_head": True}), ("phi3", {"share": "all"})])
@pytest.mark.parametrize("budget", ["uniform", "variance", "global"])
def test_budget_meets_the_parameter_target(arch, extra, budget):
    dense = to_canonical(tiny_hf_model(arch))
    target = int(0.7 * count_parameters(dense).total)
    _, model = sliced(arch, target_params=target, budget=budget, **extra)
    widths = model.config.residual_widths
    assert all(w % 8 == 0 for w in widths)
    assert independent_count(model.config) == count_parameters(model).total <= target
    assert count_parameters(model).total > 0.5 * count_parameters(dense).total  # not wildly under (width steps of 8)


def test_global_budget_gives_unequal_widths_under_the_target():
    dense = to_canonical(tiny_hf_model("llama"))
    target = int(0.6 * count_parameters(dense).total)
    _, model = sliced("llama", target_params=target, budget="global", slice_head=True)
    assert count_parameters(model).total <= target
    assert len(set(model.config.residual_widths)) > 1


def test_shared_widths_must_match():
    with pytest.raises(ToolchainError, match="share one rotation"):
        sliced("llama", widths=[56, 48, 48, 48], share="layer")


# ---- honest accounting: a larger result is refused before anything is written ----

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama").save_pretrained(root / "model")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in torch.randint(3, VOCAB, (4000,), generator=gen).tolist()]
    (root / "calib.txt").write_text(" ".join(words))
    return root


def compress(root, out, **kwargs):
    from toolchain.compress.stage import CompressOptions, compress_to_dir

    options = CompressOptions(model=str(root / "model"), calib=str(root / "calib.txt"), nsamples=4, seqlen=16, **kwargs)
    return compress_to_dir(options, out)


def test_larger_result_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NotSmallerError, match="--allow-larger") as err:
        compress(tiny_checkpoint, out, slice=0.1, tie="untie")
    assert "--slice" in str(err.value) and not out.exists()
    with pytest.raises(NotSmallerError):
        compress(tiny_checkpoint, out, target_ratio=1.0)
    assert not out.exists()
    result = compress(tiny_checkpoint, out, slice=0.1, tie="untie", allow_larger=True)
    assert not result.report["parameters"]["smaller"] and out.exists()


def test_target_ratio_is_met_against_the_tied_source(tiny_checkpoint, tmp_path):
    result = compress(tiny_checkpoint, tmp_path / "out", target_ratio=0.8, share="layer")
    params, size = result.report["parameters"], result.report["weight_bytes"]
    assert params["compressed"]["total"] <= 0.8 * params["dense"]["total"]
    assert size["compressed"] < size["dense"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight


def test_cli_says_so_and_exits_2(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from toolchain.app.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["slice", "--model", str(tiny_checkpoint / "model"), "--out", str(out),
                                      "--slice", "0.05", "--tie", "untie", "--calib", str(tiny_checkpoint / "calib.txt"),
                                      "--nsamples", "4", "--seqlen", "16"])
    assert result.exit_code == 2, result.output
    assert "not be smaller" in result.output and not out.exists()
