"""The roofline planner: parameter counts against transformers and by hand, memory fit, bounds,
calibration and the `toolchain plan` command. Configs only, no weights: runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from toolchain.analysis import roofline as rl
from toolchain.app.cli import app
from toolchain.core.errors import ArtifactError, InvalidOptionError, ModelNotFoundError

from tiny_models import ARCHS, tiny_config

GiB = 2**30


def test_dense_counts_match_transformers_for_every_arch():
    for arch in ARCHS:
        config = tiny_config(arch)
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(config)
        expected = sum(p.numel() for p in model.parameters())  # a tied table is one Parameter
        assert rl.count_params(rl.model_shape(config))["total"] == expected, arch


def test_builtin_configs_reproduce_published_parameter_counts():
    published = {  # totals of the released checkpoints (model cards / safetensors metadata)
        "llama-2-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192, "mistral-7b": 7_241_732_096,
        "phi-2": 2_779_683_840, "phi-3-mini": 3_821_079_552, "opt-125m": 125_239_296,
        "qwen2-0.5b": 494_032_768, "smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400,
    }
    for name, total in published.items():
        assert rl.count_params(rl.model_shape(name))["total"] == total, name


def test_builtin_short_names_agree_with_the_model_loader():
    from toolchain.data.sources import SHORT_NAMES

    checked = 0
    for short, target in SHORT_NAMES.items():
        known = rl.known_config(short)
        if known is not None and "/" in target:
            assert known["_name_or_path"] == target, short
            checked += 1
    assert checked >= 5


def test_llama2_70b_fp16_needs_two_80gb_gpus():
    plan = rl.plan("llama-2-70b", slice=0.3, gpus="h100-80gb,a100-80gb", dtype="fp16").to_dict()
    for row in plan["gpus"]:
        assert row["dense"]["fits"] is False
        assert row["dense"]["n_gpus"] == 2
    # 68,976,648,192 params x 2 bytes
    assert plan["variants"]["dense"]["weight_bytes"] == 137_953_296_384


def test_llama2_70b_slice_30_weight_ratio_by_hand():
    D, L, H, G, hd, I, V = 8192, 80, 64, 8, 128, 28672, 32000
    d = 5728  # int(0.7 * 8192) = 5734, rounded down to a multiple of 8
    dense_layer = D * H * hd + 2 * D * G * hd + H * hd * D + 3 * D * I + 2 * D  # q, k, v, o, gate/up/down, 2 RMSNorms
    dense = V * D + L * dense_layer + D + V * D  # embedding, layers, final norm, untied head
    sliced_layer = (d * (H * hd + 2 * G * hd)  # q/k/v read d
                    + H * hd * d  # o writes d
                    + 2 * d * I + I * d  # gate/up read d, down writes d
                    + 2 * d * d)  # two d x d shortcuts; fused norms have no weights
    last_layer = d * (H * hd + 2 * G * hd) + H * hd * d + 2 * d * I + I * D + d * d + d * D  # writes D for the head
    sliced = V * d + (L - 1) * sliced_layer + last_layer + V * D  # V x d embedding, head stays V x D
    assert (dense, sliced) == (68_976_648_192, 53_642_050_560)  # the arithmetic itself

    plan = rl.plan("llama-2-70b", slice=0.3, gpus="h100-80gb", dtype="fp16").to_dict()
    dense_v, sliced_v = plan["variants"]["dense"], plan["variants"]["sliced"]
    assert sliced_v["residual_width"] == d and sliced_v["head_width"] == D
    assert sliced_v["params"]["total"] == sliced
    assert sliced_v["params"]["shortcuts"] == (2 * L - 1) * d * d + d * D
    assert sliced_v["weight_bytes"] / dense_v["weight_bytes"] == pytest.approx(sliced / dense, rel=1e-12)
    assert plan["ratios"]["weight_bytes"] == pytest.approx(0.77768, abs=1e-5)


def test_phi2_fits_24gb_and_parallel_block_count_by_hand():
    D, L, I, V = 2560, 32, 10240, 51200
    d = 1792  # int(0.7 * 2560)
    # parallel block: one position per layer, so one shortcut per layer; every linear has a bias
    layer = 3 * (d * D + D) + (D * d + d) + (d * I + I) + (I * d + d) + d * d
    last = 3 * (d * D + D) + (D * D + D) + (d * I + I) + (I * D + D) + d * D
    sliced = V * d + (L - 1) * layer + last + V * D + V  # head keeps its bias
    plan = rl.plan("phi-2", slice=0.3, gpus="rtx4090-24gb,rtx3090-24gb", dtype="fp16").to_dict()
    assert plan["variants"]["sliced"]["params"]["total"] == sliced
    for row in plan["gpus"]:
        for variant in ("dense", "sliced"):
            assert row[variant]["fits"] is True and row[variant]["n_gpus"] == 1
            assert row[variant]["need_bytes"] < 0.9 * 24 * GiB


def test_decode_bound_is_bytes_over_bandwidth():
    D, L, H, hd, I, V, ctx = 4096, 32, 32, 128, 11008, 32000, 1024
    params = V * D + L * (4 * D * D + 3 * D * I + 2 * D) + D + V * D
    read = (params - V * D) * 2  # fp16 weights except the embedding table (a lookup reads one row)
    kv = 2 * L * 1 * ctx * H * hd * 2  # K and V of every cached token
    plan = rl.plan("llama-2-7b", slice=0.3, gpus="h100-80gb", batch=1, context=ctx).to_dict()
    dense = plan["gpus"][0]["dense"]
    assert dense["decode_bound"] == "memory"
    assert dense["decode_ms"] == pytest.approx((read + kv) / 3.35e12 * 1e3, rel=1e-12)
    assert dense["decode_tokens_per_s"] == pytest.approx(3.35e12 / (read + kv), rel=1e-12)


def test_prefill_bound_is_flops_over_peak():
    D, L, H, hd, I, V, T = 4096, 32, 32, 128, 11008, 32000, 4096
    body = L * (4 * D * D + 3 * D * I)
    flops = 2 * T * body + 2 * V * D + L * 2 * H * (hd + hd) * T * (T + 1) / 2  # blocks, last logits, causal attn
    dense = rl.plan("llama-2-7b", gpus="a100-80gb", context=T).to_dict()["gpus"][0]["dense"]
    assert dense["prefill_bound"] == "compute"
    assert dense["prefill_ms"] == pytest.approx(flops / 312e12 * 1e3, rel=1e-12)


def test_slice_head_shrinks_head_and_last_shortcut():
    D, I, V, d = 4096, 11008, 32000, 3584  # llama-2-7b at 12.5 %: int(0.875 * 4096) = 3584
    shape = rl.model_shape("llama-2-7b")
    full = rl.count_params(shape, rl.sliced_layout(shape, 0.125))
    head = rl.count_params(shape, rl.sliced_layout(shape, 0.125, slice_head=True))
    assert full["total"] - head["total"] == V * (D - d) + d * (D - d) + I * (D - d)  # head, shortcut, last down


def test_kv_cache_is_not_sliced_and_counts_gqa_heads():
    plan = rl.plan("llama-2-70b", slice=0.5, gpus="h200", batch=2, context=1000).to_dict()
    expected = 2 * 80 * 2 * 1000 * 8 * 128 * 2
    assert plan["variants"]["dense"]["kv_cache_bytes"] == expected
    assert plan["variants"]["sliced"]["kv_cache_bytes"] == expected


def test_bad_gpu_name_and_bad_slice_raise():
    with pytest.raises(InvalidOptionError, match="h100-80gb"):
        rl.plan("phi-2", gpus="v100")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(InvalidOptionError, match=r"\[0, 1\)"):
            rl.plan("phi-2", slice=bad)
    assert rl.get_gpu("NVIDIA H100 80GB HBM3").name == "h100-80gb"  # torch.cuda.get_device_name() text
    with pytest.raises(ModelNotFoundError, match="config.json"):
        rl.resolve_config("nobody/not-a-model")


def test_local_config_and_already_sliced_canonical_config(tmp_path):
    from toolchain.model.modeling import SlicedConfig, SlicedForCausalLM, count_parameters

    tf.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2).save_pretrained(tmp_path / "qwen")
    dense = rl.model_shape(str(tmp_path / "qwen"))
    assert dense.qkv_bias and not dense.o_bias and dense.num_kv_heads == 2

    canonical = SlicedConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, residual_widths=[48, 40, 48, 40, 64], shortcuts=[True] * 4,
                             intermediate_sizes=[80, 96], qkv_bias=True, mlp_down_bias=True)
    canonical.save_pretrained(tmp_path / "sliced")
    with torch.device("meta"):
        actual = count_parameters(SlicedForCausalLM(canonical)).total
    plan = rl.plan(str(tmp_path / "sliced"), gpus="rtx4090").to_dict()
    assert plan["variants"]["dense"] is None
    assert plan["variants"]["sliced"]["params"]["total"] == actual


def test_fit_efficiency_recovers_factors_and_scales_the_prediction(tmp_path):
    n, weight_bytes, kv_token = 1_000_000_000, 2_000_000_000, 100_000
    h100 = rl.GPUS["h100-80gb"]
    prefill_ms = 2 * n * 1 * 512 / (h100.fp16_flops * 0.5) * 1e3  # ran at 50 % of peak FLOP/s
    decode_bytes = sum(weight_bytes + kv_token * (256 + i) for i in range(16))
    decode_ms = decode_bytes / (h100.bandwidth * 0.8) * 1e3  # 80 % of peak bandwidth
    model = {"params": n, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token}
    bench = {"gpu": "NVIDIA H100 80GB HBM3", "dtype": "fp16", "results": [
        {"phase": "prefill", "measured_ms": prefill_ms, "batch": 1, "tokens": 512, "context": 0, "model": model},
        {"phase": "decode", "measured_ms": decode_ms, "batch": 1, "tokens": 16, "context": 256, "model": model},
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    eff = rl.fit_efficiency(path)
    assert (eff.gpu, eff.prefill_samples, eff.decode_samples) == ("h100-80gb", 1, 1)
    assert eff.compute == pytest.approx(0.5) and eff.bandwidth == pytest.approx(0.8)

    ideal = rl.plan("phi-2", gpus="h100").to_dict()["gpus"][0]["dense"]
    tuned = rl.plan("phi-2", gpus="h100", efficiency=eff).to_dict()
    assert tuned["gpus"][0]["dense"]["decode_ms"] == pytest.approx(ideal["decode_ms"] / 0.8)
    assert tuned["calibration"]["bandwidth"] == pytest.approx(0.8)
    # a config-described model: timing exactly the planner's own bound gives efficiency 1
    bound = ideal["decode_ms"]
    same = rl.fit_efficiency({"gpu": "h100-80gb", "results": [
        {"phase": "decode", "measured_ms": bound, "tokens": 1, "context": 4096, "model": "phi-2"}]})
    assert same.bandwidth == pytest.approx(1.0) and same.compute == 1.0
    with pytest.raises(ArtifactError):
        rl.fit_efficiency({"gpu": "h100", "results": [{"phase": "decode"}]})


def test_cli_plan_table_json_and_errors(tmp_path):
    runner = CliRunner()
    table = runner.invoke(app, ["plan", "--model", "llama-2-70b", "--slice", "0.3", "--gpu", "all"])
    assert table.exit_code == 0, table.output
    for name in rl.GPUS:
        assert name in table.output
    assert "sliced 30%" in table.output and "5728" in table.output

    as_json = runner.invoke(app, ["plan", "--model", "phi-2", "--gpu", "rtx4090-24gb", "--batch", "4",
                                  "--context", "2048", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["schema"] == rl.SCHEMA and data["settings"]["batch"] == 4
    assert [row["gpu"]["name"] for row in data["gpus"]] == ["rtx4090-24gb"]
    assert data["gpus"][0]["dense"]["fits"] is True

    bad = runner.invoke(app, ["plan", "--model", "phi-2", "--gpu", "v100"])
    assert bad.exit_code == 2 and "h200-141gb" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["plan", "--model", "phi-2", "--slice", "1"]).exit_code == 2
    assert runner.invoke(app, ["plan", "--model", "nobody/nothing"]).exit_code == 2


def test_plan_sizes_follow_the_slice_options():
    """The sliced variant is the model `toolchain slice` writes: SmolLM2 stays tied by default."""
    def total(**options):
        return rl.plan("smollm2-135m", gpus="h100", **options).to_dict()["variants"]["sliced"]["params"]["total"]

    assert total(slice=0.3) == 103_559_936  # --tie slice --share none, as `slice` writes it
    assert total(slice=0.3, tie="untie") > total(slice=0.3, tie="project") > total(slice=0.3)
    assert total(slice=0.3, share="all") < total(slice=0.3, share="layer") < total(slice=0.3)
    assert total(method="modegpt", compression=0.3) < rl.count_params(rl.model_shape("smollm2-135m"))["total"]
    with pytest.raises(InvalidOptionError, match="--tie"):
        rl.plan("smollm2-135m", tie="keep")
    markdown = rl.render_markdown(rl.plan("smollm2-135m", gpus="h100", share="layer"))
    assert "| shortcuts |" in markdown and "--share layer" in markdown


def test_cli_plan_takes_the_slice_size_options():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--model", "smollm2-135m", "--slice", "0.3", "--tie", "project",
                                 "--share", "layer", "--gpu", "h100", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["tie"] == "project" and data["settings"]["share"] == "layer"
    assert data["variants"]["sliced"]["params"]["total"] == rl.plan(
        "smollm2-135m", tie="project", share="layer", gpus="h100").to_dict()["variants"]["sliced"]["params"]["total"]
    assert runner.invoke(app, ["plan", "--model", "smollm2-135m", "--share", "some"]).exit_code == 2
