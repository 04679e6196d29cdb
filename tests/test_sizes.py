"""The size model (toolchain/model/sizes): counts equal the tensors of real models, KV bytes equal a
real cache, and `toolchain plan` predicts exactly the parameters `toolchain slice` writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import ARCHS, VOCAB, calibration_batch, tiny_hf_model
from toolchain.analysis import roofline
from toolchain.model import sizes
from toolchain.model.adapters import to_canonical
from toolchain.model.modeling import SlicedConfig, SlicedForCausalLM


def numel(model) -> int:
    """Every parameter once (a tied table is one Parameter)."""
    return sum(p.numel() for p in model.parameters())


def test_dense_and_canonical_counts_are_the_tensors_of_every_arch():
    for arch in ARCHS:
        hf = tiny_hf_model(arch)
        dense = sizes.describe(hf.config)
        assert sizes.parameters(dense).total == numel(hf), arch
        canonical = to_canonical(hf)
        assert sizes.parameters(sizes.canonical(dense)).total == numel(canonical), arch
        assert sizes.count_parameters(canonical).total == numel(canonical), arch


def test_kv_bytes_are_the_bytes_of_a_real_cache():
    from transformers.cache_utils import DynamicCache

    config = SlicedConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96, v_head_dims=[16, 8, 12],
                          intermediate_sizes=[96, 40, 64])  # per-layer dims, as MoDeGPT leaves them
    for dtype in (torch.float32, torch.float16):
        model = SlicedForCausalLM(config).to(dtype).eval()
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.randint(0, VOCAB, (2, 7)), cache=cache, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        actual = sum(t.numel() * t.element_size() for pair in layers for t in pair)
        assert sizes.kv_cache_bytes(sizes.describe(config), 2, 7, dtype) == actual
        assert sizes.parameters(sizes.describe(config)).total == numel(model)


# ---- plan == slice ----

def _checkpoint(root, hf_model):
    """An HF checkpoint dir with a word-level tokenizer over its vocabulary, and calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = hf_model.config.vocab_size
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.save_pretrained(root / "model")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(root / "model")
    words = torch.randint(3, vocab, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    (root / "calib.txt").write_text(" ".join(f"w{i}" for i in words))
    return root


def _slice(root, out, nsamples=4, seqlen=16, **options):
    from toolchain.compress.stage import CompressOptions, compress_to_dir

    return compress_to_dir(CompressOptions(model=str(root / "model"), calib=str(root / "calib.txt"),
                                           nsamples=nsamples, seqlen=seqlen, device="cpu", allow_larger=True,
                                           **options), out)


def _planned(root, **options) -> dict:
    """The sliced variant's parameters as `toolchain plan` predicts them from the checkpoint's config."""
    config = roofline.resolve_config(str(root / "model"))
    return roofline.plan(config, gpus="h100", **options).to_dict()["variants"]["sliced"]["params"]


def _written(out) -> int:
    return numel(tf.AutoModelForCausalLM.from_pretrained(out))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: _checkpoint(tmp_path_factory.mktemp(arch), tiny_hf_model(arch)) for arch in ("llama", "opt", "phi")}


# --tie only matters for a tied RMSNorm model (tiny llama); OPT (LayerNorm) and Phi-2 (parallel) are untied
CASES = [("llama", tie, share) for tie in ("slice", "project", "untie") for share in ("none", "layer", "all")] + \
    [(arch, "slice", share) for arch in ("opt", "phi") for share in ("none", "layer", "all")]


@pytest.mark.parametrize("arch,tie,share", CASES)
def test_plan_predicts_what_slice_writes(checkpoints, tmp_path, arch, tie, share):
    root = checkpoints[arch]
    for slice_head in (False, True) if share == "all" else (False,):
        out = tmp_path / f"out-{slice_head}"
        result = _slice(root, out, slice=0.3, tie=tie, share=share, slice_head=slice_head)
        predicted = _planned(root, slice=0.3, tie=tie, share=share, slice_head=slice_head)
        written = result.report["parameters"]["compressed"]
        assert {k: predicted[k] for k in written} == written, (arch, tie, share, slice_head)
        assert predicted["total"] == _written(out)
        assert written["total"] == sizes.count_parameters(tf.AutoModelForCausalLM.from_pretrained(out)).total


def test_modegpt_dims_are_exact_for_a_uniform_allocation():
    from toolchain.compress.modegpt import ModegptOptions, modegpt_model, slicegpt_modegpt_model
    from toolchain.compress.options import SliceOptions

    ids, mask = calibration_batch(8)
    for arch in ("llama", "phi"):
        hf = tiny_hf_model(arch)
        dense = sizes.describe(hf.config)
        for method, multiple in (("modegpt", 1), ("modegpt", 8), ("slicegpt+modegpt", 1), ("slicegpt+modegpt", 8)):
            model = to_canonical(hf)
            # every layer the same sparsity
            options = ModegptOptions(compression=0.3, temperature=math.inf, multiple=multiple)
            if method == "modegpt":
                modegpt_model(model, ids, mask, options)
            else:
                slicegpt_modegpt_model(model, ids, mask, SliceOptions(slice=0.3), options)
            plan = sizes.CompressionPlan(method=method, slice=0.3, compression=0.3, modegpt_multiple=multiple)
            predicted = sizes.planned(dense, plan)
            assert list(predicted.qk_head_dims) == model.config.qk_head_dims, (arch, method)
            assert list(predicted.v_head_dims) == model.config.v_head_dims, (arch, method)
            assert list(predicted.intermediate_sizes) == model.config.intermediate_sizes, (arch, method)
            assert sizes.parameters(predicted).total == numel(model), (arch, method)


def test_modegpt_multiples_land_on_the_target_for_any_allocation():
    """SmolLM2's shape: with multiples of 8 every kept dim is one, q/k = v, and the corrected block
    total is within one MLP step (8 channels) of Σ (1 − s_l)·p_l, uniform or not."""
    shape = roofline.known_config("smollm2-135m")
    dense = sizes.canonical(sizes.describe(tf.LlamaConfig(**{k: v for k, v in shape.items()
                                                             if not k.startswith("_") and k != "short"})))
    blocks = lambda d: [sizes.block_parameters(d, layer) for layer in range(d.num_layers)]  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    for sparsities in ([0.25] * 30, (torch.rand(30, generator=gen) * 0.6).tolist()):
        target = sum((1 - s) * p for s, p in zip(sparsities, blocks(dense)))
        kept = sizes.modegpt_dims(dense, sparsities, 8)
        assert kept.qk_head_dims == kept.v_head_dims
        assert all(d % 8 == 0 for d in kept.qk_head_dims + kept.intermediate_sizes)
        assert abs(sum(blocks(kept)) - target) <= 8 * 3 * 576 / 2
        # every layer stays within a step or two of its own share
        assert all(abs(d - (1 - s) * 1536) <= 16 for d, s in zip(kept.intermediate_sizes, sparsities))


def test_modegpt_through_slice_is_close_to_the_uniform_prediction(tmp_path):
    """The compressor's per-layer allocation follows the data; only the total is known in advance."""
    root = _checkpoint(tmp_path, tiny_hf_model("llama"))
    result = _slice(root, tmp_path / "out", method="modegpt", compression=0.3)
    predicted = _planned(root, method="modegpt", compression=0.3)
    written = result.report["parameters"]["compressed"]
    assert predicted["embeddings"] == written["embeddings"] and predicted["lm_head"] == written["lm_head"]
    assert predicted["blocks"] == pytest.approx(written["blocks"], rel=0.03)


def test_smollm2_135m_plan_equals_slice(tmp_path):
    shape = roofline.known_config("smollm2-135m")
    config = tf.LlamaConfig(**{k: v for k, v in shape.items() if not k.startswith("_") and k != "short"},
                            max_position_embeddings=64)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.AutoModelForCausalLM.from_config(config)
    root = _checkpoint(tmp_path, model)
    del model
    result = _slice(root, tmp_path / "out", nsamples=2, seqlen=16, slice=0.3)
    written = result.report["parameters"]["compressed"]["total"]
    plan = CliRunner().invoke(roofline_cli(), ["plan", "--model", str(root / "model"), "--slice", "0.3",
                                               "--gpu", "h100", "--json"])
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["variants"]["sliced"]["params"]["total"] == written == 103_559_936
    assert data["variants"]["dense"]["params"]["total"] == 134_515_008  # the published count
    assert _planned(root, slice=0.3)["total"] == roofline.plan("smollm2-135m", slice=0.3, gpus="h100").to_dict()[
        "variants"]["sliced"]["params"]["total"]


def roofline_cli():
    from toolchain.app.cli import app

    return app


def test_budget_size_model_is_the_tensor_list():
    """The width budget's quadratic form evaluates to the counted total at any widths."""
    from toolchain.compress import budget

    for arch in ("llama", "opt", "phi"):
        model = to_canonical(tiny_hf_model(arch))
        n = model.config.num_positions
        for share in ("none", "layer", "all"):
            groups = budget.position_groups(model.config, share, slice_head=True)
            for project in (False, True):
                size = budget.size_model(model.config, groups, project_table=project)
                widths = [48 if groups[p] % 2 else 40 for p in range(n + 1)]
                if share != "none":
                    widths = [40] * (n + 1)
                planned = sizes.sliced(sizes.describe(model.config), widths, groups, project)
                assert size.total(widths) == sizes.parameters(planned).total
