"""Latency harness on a tiny sliced Llama: well-formed ordered percentiles, the ideal-vs-measured
comparison, a stable bench JSON (also readable by the planner's calibration), plots, and the
`toolchain bench` errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from runtime import latency
from runtime.latency import BenchConfig, measure_session, model_cost
from runtime.sessions import TorchSession
from tiny_models import VOCAB, save_tiny_checkpoint, tiny_hf_model
from toolchain.model.adapters import to_canonical
from toolchain.analysis import bench_report, roofline
from toolchain.app import bench
from toolchain.app.bench import bench_build
from toolchain.app.cli import app
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.core.errors import ArtifactError, InvalidOptionError

SMALL = dict(prompts="8,16", batches="1,2", steps=4, warmup=1, repeats=2, context=8, threads=1)


def sliced_tiny(source: str | None = None, fraction: float = 0.3):
    model = to_canonical(tiny_hf_model("llama"), source_model=source).eval()
    calib = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    return slice_model(model, calib, torch.ones_like(calib), SliceOptions(slice=fraction))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A build dir as `toolchain build` lays it out: sliced/ (+ compression report naming the source
    checkpoint) and onnx/."""
    from exporters.onnx import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("latency")
    source = save_tiny_checkpoint("llama", root / "source")
    build = root / "build"
    model = sliced_tiny(str(source))
    model.save_pretrained(build / "sliced")
    (build / "sliced" / "compression_report.json").write_text(json.dumps({"options": {"model": str(source),
                                                                                      "tie": "slice"}}))
    # torchscript: seconds instead of tens of seconds; bench mirrors it for the dense export
    export_onnx(model, build / "onnx", ExportOptions(dtype="fp32", exporter="torchscript"))
    return build


@pytest.fixture(scope="module")
def report(build, tmp_path_factory) -> bench.BenchResult:
    calls = []
    result = bench_build(build, build / "reports" / "latency", progress=lambda d, t: calls.append((d, t)), **SMALL)
    result.calls = calls
    return result


def test_percentiles_are_ordered_and_positive():
    session = TorchSession(sliced_tiny())
    config = BenchConfig(prompts=(4, 12), batches=(1, 3), steps=20, warmup=2, repeats=3, context=6)
    results = measure_session(session, config, variant="sliced", max_positions=128)
    assert [(r["phase"], r["batch"], r["tokens"]) for r in results] == [
        ("prefill", 1, 4), ("prefill", 1, 12), ("decode", 1, 20), ("decode", 3, 20)]
    for r in results:
        assert set(r) == set(latency.RESULT_KEYS)
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
    decode = results[2]
    assert decode["samples"] == 20 and decode["context"] == 6 + 2  # cache length at the first timed step
    assert decode["measured_ms"] == pytest.approx(decode["mean_ms"] * 20)
    assert decode["tokens_per_s"] == pytest.approx(1e3 / decode["mean_ms"])
    assert results[3]["tokens_per_s"] == pytest.approx(3e3 / results[3]["mean_ms"])


class Recording(TorchSession):
    """A TorchSession that appends (its name, tokens in the call) to a shared log on every call."""

    def __init__(self, model, name, log):
        super().__init__(model, name=name)
        self.log = log

    def run(self, input_ids, attention_mask, position_ids, past):
        self.log.append((self.name, input_ids.shape[1]))
        return super().run(input_ids, attention_mask, position_ids, past)


def test_interleaved_sessions_take_turns_call_by_call():
    """Two sessions measured together alternate on every prefill repeat and decode step, the order
    reversed every round (A B B A A B ...); measured apart, all of A comes before all of B."""
    log: list = []
    entries = [latency.Measured("dense", Recording(to_canonical(tiny_hf_model("llama")).eval(), "A", log)),
               latency.Measured("sliced", Recording(sliced_tiny(), "B", log))]
    config = BenchConfig(prompts=(6,), batches=(1,), steps=4, warmup=1, repeats=4, context=5)
    results = latency.measure_sessions(entries, config, max_positions=128)
    assert [(r["variant"], r["phase"]) for r in results] == [("dense", "prefill"), ("dense", "decode"),
                                                             ("sliced", "prefill"), ("sliced", "decode")]
    assert [r["backend"] for r in results] == ["A", "A", "B", "B"] and all(r["samples"] == 4 for r in results)
    assert "all 2 models of the group resident" in results[0]["memory_kind"]
    warm, prefill, decode = log[:2], [n for n, t in log[2:] if t == 6], [n for n, t in log[2:] if t == 1]
    assert [n for n, _ in warm] == ["A", "B"]
    assert prefill == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert decode == ["A", "B", "B", "A"] * 2 + ["A", "B"]  # 1 warm-up + 4 timed steps each

    log.clear()
    latency.measure_sessions(entries, BenchConfig(**{**config.__dict__, "interleave": False}), max_positions=128)
    names = [n for n, _ in log]
    assert names == sorted(names)  # A's whole measurement, then B's


def test_load_drift_warns_only_when_the_load_moved_a_lot():
    assert latency.load_drift([[1.0, 1.0, 1.0], [1.4, 1.0, 1.0], None], cpu_count=2) is None
    warning = latency.load_drift([[1.0, 1.0, 1.0], [2.3, 1.5, 1.0]], cpu_count=2)
    assert warning and "from 1.00 to 2.30" in warning
    assert latency.load_drift([[4.0, 0, 0], [6.5, 0, 0]], cpu_count=16) is None  # < a quarter of 16 cores
    assert latency.load_drift([[4.0, 0, 0]], cpu_count=2) is None


def test_prompts_capped_by_model_and_max_prompt():
    config = BenchConfig(prompts=(128, 512, 2048), max_prompt=300)
    assert config.prompt_lengths(4096) == [128, 300]
    assert config.prompt_lengths(128) == [128]
    assert BenchConfig(context=128, steps=20, warmup=3).decode_context(100) == 77
    with pytest.raises(InvalidOptionError, match="--steps"):
        BenchConfig(steps=200).decode_context(128)


def test_cost_counts_shortcuts_and_the_tied_head():
    dense = to_canonical(tiny_hf_model("llama")).eval()
    sliced = sliced_tiny()
    d, s = model_cost(dense), model_cost(sliced)
    # hand count, tiny llama: D=64, d=int(0.7*64)//8*8=40, I=96, 4 heads x 16, 2 kv heads, V=128, 2 layers, tied
    attn = lambda w: w * (64 + 32 + 32) + 64 * w  # noqa: E731  q,k,v read w; o writes w
    mlp = lambda w: 3 * 96 * w  # noqa: E731
    assert d.shortcut_params == 0
    assert s.shortcut_params == 3 * 40 * 40 + 40 * 64  # 4 positions: d×d except the last, d×D
    assert s.matmul_params == 2 * (attn(40) + mlp(40)) - 96 * 40 + 96 * 64 \
        + s.shortcut_params + 40 * 64 + 128 * 40  # last down_proj writes D; head_proj d×D; tied head V×d
    assert s.read_params == s.params  # the tied table is streamed whole as the head
    assert s.kv_elements_per_token == d.kv_elements_per_token == 2 * 2 * (16 + 16)
    assert s.params < d.params


def test_comparison_puts_ideal_next_to_measured():
    base = dict(dtype="fp32", batch=1, context=8, tokens=4, phase="decode", backend="ort-cpu")
    results = [dict(base, variant="dense", p50_ms=10.0, measured_ms=40.0),
               dict(base, variant="sliced", p50_ms=12.0, measured_ms=48.0)]
    costs = {"dense": model_cost(to_canonical(tiny_hf_model("llama"))), "sliced": model_cost(sliced_tiny())}
    (row,) = bench_report.compare(results, costs)
    assert set(row) == set(bench_report.COMPARISON_KEYS)
    assert row["latency_ratio"] == pytest.approx(1.2) and row["speedup"] == pytest.approx(1 / 1.2)
    assert row["ideal_ratio"] < 1 and row["gap_pct"] > 20
    assert row["verdict"] == "SLOWER than dense"  # a slower slice can never hide


def test_bench_build_json_schema_is_stable(report, build):
    data = json.loads(report.json_path.read_text())
    assert list(data) == list(bench_report.TOP_KEYS)
    assert data["schema"] == "toolchain.latency/1" and data["provider"] == "cpu"
    assert {"cpu", "cpu_count", "torch_threads", "load_average"} <= set(data["machine"])
    assert {"torch", "onnxruntime", "python"} <= set(data["versions"])
    assert {(r["backend"], r["variant"]) for r in data["results"]} == {
        ("torch-cpu", "sliced"), ("ort-cpu", "sliced"), ("torch-cpu", "dense"), ("ort-cpu", "dense")}
    for r in data["results"]:
        assert list(r) == list(latency.RESULT_KEYS)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert set(r["model"]) == {"params", "weight_bytes", "kv_bytes_per_token", "flops_per_token"}
    phases = [(r["phase"], r["batch"], r["tokens"]) for r in data["results"][:4]]
    assert phases == [("prefill", 1, 8), ("prefill", 1, 16), ("decode", 1, 4), ("decode", 2, 4)]
    assert set(data["models"]) == {"dense", "sliced"}
    assert data["models"]["sliced"]["params"] < data["models"]["dense"]["params"]
    # every sliced measurement is compared with the dense one on the same backend
    assert len(data["comparisons"]) == 8
    for row in data["comparisons"]:
        assert list(row) == list(bench_report.COMPARISON_KEYS)
        assert 0 < row["ideal_ratio"] < 1 and row["latency_ratio"] > 0
    assert report.calls[-1] == (16, 16) and report.calls[0] == (0, 16)
    markdown = report.markdown_path.read_text()
    assert "Ideal vs measured" in markdown and "| ort-cpu | sliced | decode |" in markdown
    # interleaved by default; the load average at the start, after each backend and at the end
    assert data["config"]["interleave"] is True and "timed in turns" in markdown
    machine = data["machine"]
    assert len(machine["load_samples"]) == 3 and machine["load_samples"][0] == machine["load_average"]
    assert len(machine["load_average_end"]) == 3 and "load_warning" in machine
    assert "1-minute load average at the start, after each backend and at the end" in markdown
    if machine["load_warning"]:
        assert f"**Warning: {machine['load_warning']}.**" in markdown


def test_bench_build_times_dense_and_sliced_of_one_backend_together(build, tmp_path, monkeypatch):
    groups = []
    real = bench.measure_sessions

    def recording(entries, *args, **kwargs):
        groups.append([(e.session.name, e.variant) for e in entries])
        return real(entries, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_sessions", recording)
    tiny = {"prompts": "8", "batches": "1", "steps": 2, "warmup": 0, "repeats": 1, "context": 4, "threads": 1}
    bench_build(build, tmp_path / "out", **tiny)
    assert groups == [[("torch-cpu", "sliced"), ("torch-cpu", "dense")], [("ort-cpu", "sliced"), ("ort-cpu", "dense")]]
    groups.clear()
    data = bench_build(build, tmp_path / "apart", interleave=False, **tiny).data
    assert len(groups) == 4 and all(len(g) == 1 for g in groups) and data["config"]["interleave"] is False


def test_bench_json_feeds_the_planner_calibration(report):
    data = json.loads(report.json_path.read_text())
    with pytest.raises(ArtifactError, match="without a GPU.*--provider cuda"):  # the CPU run says null
        roofline.fit_efficiency(data)
    data["gpu"] = "a100-80gb"  # as a GPU run records it
    efficiency = roofline.fit_efficiency(data)
    assert efficiency.prefill_samples == 8 and efficiency.decode_samples == 8
    assert efficiency.compute > 0 and efficiency.bandwidth > 0


def test_plots_are_written(report):
    for name in ("prefill_latency.png", "decode_throughput.png", "ideal_vs_measured.png"):
        path = report.json_path.parent / name
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_build_without_onnx(build, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(build / "sliced", partial / "sliced")
    with pytest.raises(ArtifactError, match=r"toolchain build --target onnx.*--torch-only"):
        bench_build(partial, tmp_path / "out")
    result = CliRunner().invoke(app, ["bench", str(partial)])
    assert result.exit_code == 2
    assert "has no onnx/ export" in result.output and "Traceback" not in result.output


def test_bench_cli_errors_are_one_line(build, tmp_path):
    runner = CliRunner()
    not_build = runner.invoke(app, ["bench", str(tmp_path)])
    assert not_build.exit_code == 2 and "is not a build dir" in not_build.output
    provider = runner.invoke(app, ["bench", str(build), "--provider", "tpu"])
    assert provider.exit_code == 2 and "unknown --provider 'tpu'" in provider.output
    prompts = runner.invoke(app, ["bench", str(build), "--prompts", "128,abc"])
    assert prompts.exit_code == 2 and "--prompts must be comma-separated integers" in prompts.output


def test_bench_cli_torch_only_writes_report(build, tmp_path):
    out = tmp_path / "torch-only"
    result = CliRunner().invoke(app, ["bench", str(build), "--torch-only", "--no-dense", "--prompts", "8",
                                      "--batches", "1", "--steps", "3", "--warmup", "0", "--repeats", "1",
                                      "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "latency.json").read_text())
    assert {r["backend"] for r in data["results"]} == {"torch-cpu"}
    assert data["skipped"][0]["variant"] == "dense" and data["comparisons"] == []
    assert np.isfinite([r["p99_ms"] for r in data["results"]]).all()


def test_bench_measures_the_quantized_graph_next_to_fp32_and_dense(build, tmp_path):
    """A build with quantized/ gets an `ort-cpu sliced-int4` row whose ideal ratio comes from the bytes
    the quantized graph actually stores; asking for it on a build without one is a clear error."""
    from exporters.quantize import quantize_onnx

    with_int4 = tmp_path / "with-int4"
    shutil.copytree(build, with_int4, ignore=shutil.ignore_patterns("reports"))
    with pytest.raises(ArtifactError, match="--quantize int4"):
        bench_build(with_int4, tmp_path / "out-missing", quantized=True, **SMALL)
    quantize_onnx(with_int4 / "onnx", with_int4 / "quantized", mode="int4", parity=False)
    data = bench_build(with_int4, tmp_path / "out", **SMALL).data  # quantized=None: measured because present

    assert ("ort-cpu", "sliced-int4") in {(r["backend"], r["variant"]) for r in data["results"]}
    assert all(r["dtype"] == "int4" for r in data["results"] if r["variant"] == "sliced-int4")
    int4, fp32 = data["models"]["sliced-int4"], data["models"]["sliced"]
    stored, read = latency.graph_weight_bytes(with_int4 / "quantized" / "model.onnx")
    assert (int4["stored_bytes"], int4["stored_read_bytes"]) == (stored, read)
    assert read < stored < fp32["weight_bytes_fp32"]  # the embedding table is a lookup, not read whole
    assert int4["params"] == fp32["params"]
    ideal = {(c["variant"], c["phase"], c["batch"]): c["ideal_ratio"] for c in data["comparisons"]
             if c["backend"] == "ort-cpu"}
    assert ideal[("sliced-int4", "decode", 1)] < ideal[("sliced", "decode", 1)]
    assert "| ort-cpu | sliced-int4 | decode |" in (tmp_path / "out" / "latency.md").read_text()
