"""Decode/prefill latency of Llama-shaped models (random weights) dense and SliceGPT-sliced, on torch
eager and ONNX Runtime CPU, with the ideal (bytes, FLOPs) ratios next to the measured ones.

    python benchmarks/latency_suite.py                                  # everything (~1 h on 2 cores)
    python benchmarks/latency_suite.py --shapes 100m --slices 0.3 --prompts 128 --steps 20
    python benchmarks/latency_suite.py --shapes 1b --slices 0.3 --backends ort --profile

Writes benchmarks/results/latency_suite.{json,md} and latency_suite_*.png (rewritten after every
variant, so an interrupted run keeps what it measured). Each model runs in its own process, so peak
RSS is that model's and memory freed by one 1B model cannot pile up under the next. Latency does not
depend on weight values, so random weights and random calibration ids stand in for a checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, llama_shaped
from runtime import latency
from toolchain.analysis import bench_plots, bench_report
from runtime.latency import BenchConfig, measure_session, model_cost
from runtime.sessions import OrtSession, TorchSession
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.compress.slicegpt.widths import uniform_widths
from toolchain.core.fileio import atomic_file
from toolchain.core.reports import write_report
from toolchain.model.modeling import SlicedForCausalLM

SCHEMA = "toolchain.latency_suite/1"
SHAPES = {  # llama_shaped() arguments
    "100m": dict(hidden=768, layers=12, heads=12, kv_heads=12, inner=2048, vocab=32000),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inner=5632, vocab=32000),
    "smoke": dict(hidden=256, layers=2, heads=4, kv_heads=4, inner=512, vocab=1000),  # checks the script itself
}
SLICES = (0.1, 0.2, 0.25, 0.3)
TARGET = ("1b", 0.3, "ort-cpu")  # the goal: sliced/dense decode ratio within 10 % of the weight-bytes ratio


def variant_name(fraction: float) -> str:
    return "dense" if fraction == 0 else f"slice-{fraction:.2f}"


def make_model(shape: str, fraction: float, calib_windows: int, calib_len: int, calibrate: bool = True):
    model = llama_shaped(**SHAPES[shape])
    if fraction and calibrate:
        ids = torch.randint(0, model.config.vocab_size, (calib_windows, calib_len),
                            generator=torch.Generator().manual_seed(0))
        slice_model(model, ids, torch.ones_like(ids), SliceOptions(slice=fraction))
    elif fraction:
        model = sliced_architecture(model, fraction)
    return model


def sliced_architecture(model, fraction: float):
    """The model slice_model would return (same widths, shortcuts and parameter shapes), with random
    weights: calibrating a 1B model costs ~10 min of float64 rotations on 2 cores and latency does
    not depend on the values."""
    config = copy.deepcopy(model.config)
    config.residual_widths = uniform_widths(config.hidden_size, fraction, config.num_positions, slice_head=False)
    config.shortcuts = [True] * config.num_positions
    return SlicedForCausalLM(config).eval()


def run_variant(shape: str, fraction: float, args, config: BenchConfig, tick) -> tuple[list[dict], dict, dict]:
    """(results, cost dict, timings) of one model on the chosen backends; at most one copy of the
    weights is resident while measuring (the torch model is dropped before ORT loads the export)."""
    variant, timings = variant_name(fraction), {}
    start = time.perf_counter()
    model = make_model(shape, fraction, args.calib_windows, args.calib_len, args.calibrate)
    timings["build_s"] = round(time.perf_counter() - start, 1)
    timings["sliced_by"] = "none" if not fraction else "slice_model" if args.calibrate else "sliced_architecture"
    cost = model_cost(model)
    max_positions = model.config.max_position_embeddings
    results = []

    def tag(rows):
        for r in rows:
            r.update(model_label=shape, slice=fraction)
        return rows

    if "torch" in args.backends:
        results += tag(measure_session(TorchSession(model, name="torch-cpu"), config, variant, "fp32", max_positions,
                                       cost.as_result_model("fp32"), tick))
    if "ort" in args.backends:
        from exporters.onnx import ExportOptions, export_onnx

        with tempfile.TemporaryDirectory(prefix="latency-suite-", dir=args.scratch) as scratch:
            start = time.perf_counter()
            export_onnx(model, Path(scratch) / "onnx", ExportOptions(dtype="fp32", exporter=args.exporter,
                                                                     optimize=args.optimize))
            timings["export_s"] = round(time.perf_counter() - start, 1)
            del model
            gc.collect()
            session = OrtSession(Path(scratch) / "onnx", "cpu", threads=args.threads)
            results += tag(measure_session(session, config, variant, "fp32", max_positions,
                                           cost.as_result_model("fp32"), tick))
            if args.profile and fraction in (0.0, TARGET[1]):
                timings["profile"] = latency.profile_ort_decode(Path(scratch) / "onnx", batch=1,
                                                                context=config.context, steps=args.profile_steps,
                                                                threads=args.threads)
            del session
    gc.collect()
    return results, cost.as_dict(), timings


def run_ab(shape: str, fractions: list[float], args, config: BenchConfig) -> dict:
    """Dense and sliced models decoding in alternating steps (latency.interleaved_decode) on each
    backend, so the ratios are not at the mercy of what the machine's other tenants did in between.
    All models are resident at once: mind the memory for the 1b shape (~3 GB per fp32 model)."""
    from exporters.onnx import ExportOptions, export_onnx

    variants = {"dense": 0.0, **{variant_name(f): f for f in fractions}}
    rows, costs = [], {}
    if "torch" in args.backends:
        models = {name: make_model(shape, f, args.calib_windows, args.calib_len, args.calibrate)
                  for name, f in variants.items()}
        costs = {name: model_cost(model) for name, model in models.items()}
        sessions = {name: TorchSession(model, name="torch-cpu") for name, model in models.items()}
        rows += _ab_rows(sessions, costs, variants, "torch-cpu", config)
        del models, sessions
        gc.collect()
    if "ort" in args.backends:
        paths = {}
        with tempfile.TemporaryDirectory(prefix="latency-suite-ab-", dir=args.scratch) as scratch:
            for name, f in variants.items():  # one torch model in memory at a time
                model = make_model(shape, f, args.calib_windows, args.calib_len, args.calibrate)
                costs[name] = model_cost(model)
                paths[name] = Path(scratch) / name
                export_onnx(model, paths[name], ExportOptions(dtype="fp32", exporter=args.exporter,
                                                              optimize=args.optimize))
                del model
                gc.collect()
            sessions = {name: OrtSession(path, "cpu", threads=args.threads) for name, path in paths.items()}
            rows += _ab_rows(sessions, costs, variants, "ort-cpu", config)
            del sessions
    return {"shape": shape, "slices": list(fractions), "context": config.decode_context(None) + config.warmup,
            "steps": config.steps, "sliced_by": "slice_model" if args.calibrate else "sliced_architecture",
            "rows": rows}


def _ab_rows(sessions: dict, costs: dict, variants: dict, backend: str, config: BenchConfig) -> list[dict]:
    rows, context = [], config.decode_context(None)
    middle = context + config.warmup + config.steps // 2
    for batch in config.batches:
        times = latency.interleaved_decode(sessions, batch, context, config.warmup, config.steps)
        dense = latency.percentiles(times["dense"])["p50_ms"]
        for name, fraction in variants.items():
            if name == "dense":
                continue
            sliced = latency.percentiles(times[name])["p50_ms"]
            pairs = sorted(s / d for s, d in zip(times[name], times["dense"]))
            ratio, weight_ratio = sliced / dense, costs[name].params / costs["dense"].params
            rows.append({"backend": backend, "slice": fraction, "batch": batch, "dense_p50_ms": dense,
                         "sliced_p50_ms": sliced, "latency_ratio": ratio,
                         "pair_ratio_median": float(pairs[len(pairs) // 2]), "weight_bytes_ratio": weight_ratio,
                         "read_bytes_ratio": costs[name].read_params / costs["dense"].read_params,
                         "ideal_ratio": costs[name].decode_bytes("fp32", batch, middle)
                         / costs["dense"].decode_bytes("fp32", batch, middle),
                         "gap_vs_weight_bytes_pct": (ratio / weight_ratio - 1) * 100,
                         "load_average": latency.load_average()})
            print(f"  A/B {backend} {name} batch {batch}: sliced/dense {ratio:.3f} (weight bytes "
                  f"{weight_ratio:.3f})", flush=True)
    return rows


def target_summary(data: dict) -> dict | None:
    shape, fraction, backend = TARGET
    rows = [c for c in data["comparisons"] if c["model_label"] == shape and c["variant"] == variant_name(fraction)
            and c["backend"] == backend and c["phase"] == "decode"]
    ab = data.get("ab", {}).get(shape)
    if not rows and not ab:
        return None
    out = []
    for c in rows:
        gap = (c["latency_ratio"] / c["weight_bytes_ratio"] - 1) * 100
        out.append({"batch": c["batch"], "latency_ratio": c["latency_ratio"],
                    "weight_bytes_ratio": c["weight_bytes_ratio"],
                    "read_bytes_ratio": c["read_bytes_ratio"], "gap_vs_weight_bytes_pct": gap,
                    "within_10pct": abs(gap) <= 10})
    return {"shape": shape, "slice": fraction, "backend": backend, "rows": out, "interleaved": ab}


def render(data: dict) -> str:
    m = data["machine"]
    lines = ["# Latency suite: Llama-shaped models, dense vs SliceGPT-sliced", "",
             f"{m['cpu']} ({m['cpu_count']} cores, torch threads {m['torch_threads']}, ORT threads "
             f"{data['config']['threads'] or 'default'}); load average at start {m['load_average']}, at end "
             f"{m.get('load_average_end')} — the machine is shared, so absolute numbers are noisy. onnxruntime "
             f"{data['versions'].get('onnxruntime')}, torch {data['versions'].get('torch')}; fp32, random weights. "
             f"Decode: batch 1 and 8 from a {data['config']['context']}-token cache, p50 over "
             f"{data['config']['steps']} steps after {data['config']['warmup']} warm-up steps. ONNX: "
             f"{data['config'].get('exporter')} exporter, export fusion stage "
             f"{'on' if data['config'].get('export_optimize') else 'off (ORT fuses norms at session load)'}.", ""]
    target = data.get("target")
    if target:
        lines += [f"**Target ({target['shape']} at {target['slice']}, {target['backend']} decode): sliced/dense "
                  "p50 latency ratio vs weight-bytes ratio, within 10 %?**", ""]
        ab = target.get("interleaved")
        for row in [r for r in ab["rows"] if r["backend"] == target["backend"] and r["slice"] == target["slice"]
                    ] if ab else []:
            lines.append(f"- interleaved A/B (dense and sliced steps alternating, {ab['steps']} each), batch "
                         f"{row['batch']}: {row['latency_ratio']:.3f} (median per-step pair "
                         f"{row['pair_ratio_median']:.3f}) vs {row['weight_bytes_ratio']:.3f} (streamed bytes "
                         f"{row['read_bytes_ratio']:.3f}): {row['gap_vs_weight_bytes_pct']:+.1f} % — "
                         f"{'within' if abs(row['gap_vs_weight_bytes_pct']) <= 10 else 'NOT within'} 10 %")
        for row in target["rows"]:
            lines.append(f"- separate runs (minutes apart), batch {row['batch']}: {row['latency_ratio']:.3f} vs "
                         f"{row['weight_bytes_ratio']:.3f}: {row['gap_vs_weight_bytes_pct']:+.1f} % — "
                         f"{'within' if row['within_10pct'] else 'NOT within'} 10 %")
        lines.append("")
    if data.get("ab"):
        lines += ["## Interleaved A/B: decode, dense and sliced steps alternating", "",
                  "| shape | slice | backend | batch | dense p50 ms | sliced p50 ms | ratio | median pair ratio | "
                  "weight bytes | streamed bytes + KV | gap vs weight bytes | load |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for shape, ab in data["ab"].items():
            for row in ab["rows"]:
                lines.append(f"| {shape} | {row['slice']} | {row['backend']} | {row['batch']} | "
                             f"{row['dense_p50_ms']:.1f} | "
                             f"{row['sliced_p50_ms']:.1f} | {row['latency_ratio']:.3f} | "
                             f"{row['pair_ratio_median']:.3f} | {row['weight_bytes_ratio']:.3f} | "
                             f"{row['ideal_ratio']:.3f} | {row['gap_vs_weight_bytes_pct']:+.1f} % | "
                             f"{row['load_average'][0]} |")
        lines.append("")
    lines += ["## Ideal vs measured (sliced / dense; < 1 is faster)", "",
              "Each model measured on its own, minutes after its dense baseline, while the load average moved "
              "(per-variant load in the JSON's `timings`): these ratios carry that drift. For ratios trust the "
              "interleaved A/B table above; use this one for the prefill column and the slicing levels A/B "
              "did not cover.", "",
              "| shape | variant | params | weight bytes | FLOPs/token | backend | decode b1 | decode b8 | "
              "prefill (longest) | speedup b1 |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for c in _summary_rows(data):
        lines.append(c)
    lines += ["", "## Measured", "", "| shape | backend | variant | phase | batch | prompt / context | p50 ms | "
              "p90 ms | p99 ms | tokens/s | peak RSS MB |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        where = r["tokens"] if r["phase"] == "prefill" else r["context"]
        lines.append(f"| {r['model_label']} | {r['backend']} | {r['variant']} | {r['phase']} | {r['batch']} "
                     f"| {where} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    for name, prof in data.get("profiles", {}).items():
        lines += ["", f"## ORT profile, {name}: decode batch 1, {prof['steps']} steps", "",
                  f"{prof['ms_per_step']:.1f} ms/step in nodes; MatMul {prof['matmul_share'] * 100:.0f} % of it.", "",
                  "| op | ms/step | share | weight shape (K×N) | nodes/step | GB/s |", "|---|---:|---:|---|---:|---:|"]
        for row in prof["top"]:
            lines.append(f"| {row['op']} | {row['ms_per_step']:.2f} | {row['share'] * 100:.1f} % | "
                         f"{row.get('weight', '')} | {row['nodes']} | {row.get('gb_per_s') or ''} |")
    return "\n".join(lines) + "\n"


def _summary_rows(data: dict) -> list[str]:
    """One row per shape, variant and backend: ratios of the smallest decode batch, the largest
    batch and the longest prompt."""
    groups: dict[tuple, list] = {}
    for c in data["comparisons"]:
        groups.setdefault((c["model_label"], c["variant"], c["backend"]), []).append(c)
    rows = []
    for (label, variant, backend), items in groups.items():
        decode = sorted((c for c in items if c["phase"] == "decode"), key=lambda c: c["batch"])
        prefill = max((c for c in items if c["phase"] == "prefill"), key=lambda c: c["tokens"], default=None)
        if not decode:
            continue
        first, last = decode[0], decode[-1]
        cost = data["models"][label][variant]
        longest = (f"{prefill['latency_ratio']:.3f} (ideal {prefill['ideal_ratio']:.3f}, {prefill['tokens']} tok)"
                   if prefill else "-")
        rows.append(f"| {label} | {variant} | {cost['params'] / 1e6:.0f}M | {first['weight_bytes_ratio']:.3f} | "
                    f"{first['flops_ratio']:.3f} | {backend} | {first['latency_ratio']:.3f} | "
                    f"{last['latency_ratio']:.3f} | {longest} | {first['speedup']:.2f}x |")
    return rows


def write(data: dict, out: Path, name: str) -> None:
    write_report(out, data, render, name)
    results = data["results"]
    comparisons = data["comparisons"] + [{**row, "phase": "decode A/B", "model_label": shape}
                                         for shape, ab in data.get("ab", {}).items() for row in ab["rows"]]
    for suffix, plot, rows in (("prefill", bench_plots.plot_prefill, results),
                               ("decode", bench_plots.plot_decode, results),
                               ("by_slice", bench_plots.plot_decode_by_slice, results),
                               ("ideal", bench_plots.plot_ideal, comparisons)):
        if rows:
            with atomic_file(out / f"{name}_{suffix}.png") as tmp:
                plot(rows, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="100m,1b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--slices", default=",".join(map(str, SLICES)), help="slice fractions (dense always runs)")
    parser.add_argument("--backends", default="torch,ort", help="torch, ort")
    parser.add_argument("--prompts", default="128,512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads")
    parser.add_argument("--exporter", default="dynamo", help="dynamo (what builds ship) | torchscript (faster)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip the export's ORT fusion stage (ORT still applies its level-2 fusions at load); "
                             "that stage peaks above 16 GB for the 1b shape")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="build sliced models from their widths with random weights instead of running "
                             "slice_model (identical shapes; much faster for the 1b shape)")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-len", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="ORT profile of decode, dense and 0.3, every shape")
    parser.add_argument("--ab", action="store_true", help="also time decode of dense and --ab-slices "
                        "interleaved (all models loaded at once) for every shape")
    parser.add_argument("--ab-slices", default=str(TARGET[1]), help="slice fractions for --ab")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--scratch", default=None, help="dir for the temporary ONNX exports")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="latency_suite")
    parser.add_argument("--merge", action="store_true", help="keep the variants already in the results file "
                        "(same options) and measure only the missing ones")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "shape:fraction:out.json"
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    args.backends = {b.strip() for b in args.backends.split(",")}
    fractions = [0.0] + [float(v) for v in args.slices.split(",") if v.strip()]
    config = BenchConfig(prompts=latency.parse_ints(args.prompts, "prompts"),
                         batches=latency.parse_ints(args.batches, "batches"), steps=args.steps, warmup=args.warmup,
                         repeats=args.repeats, context=args.context, threads=args.threads)
    config.validate()

    if args.worker:
        kind, shape, fraction, out = args.worker.split(":", 3)
        with latency.torch_threads(args.threads):
            if kind == "ab":
                fractions = [float(f) for f in fraction.split(",")]
                Path(out).write_text(json.dumps(run_ab(shape, fractions, args, config)))
                return
            results, cost, timings = run_variant(shape, float(fraction), args, config, worker_tick)
        Path(out).write_text(json.dumps({"results": results, "cost": cost, "timings": timings}))
        return

    data = bench_report.new_report(None, "cpu", "fp32", config)
    data["config"].update(exporter=args.exporter, export_optimize=args.optimize, backends=sorted(args.backends))
    data.update(schema=SCHEMA, build="llama-shaped random weights", shapes={s: SHAPES[s] for s in shapes},
                models={s: {} for s in shapes}, timings={}, profiles={}, ab={}, target=None)
    previous = args.out / f"{args.name}.json"
    if args.merge and previous.is_file():
        data = merge_previous(data, json.loads(previous.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="latency-suite-parts-") as parts:
        for shape in shapes:
            for fraction in fractions:
                variant = variant_name(fraction)
                if variant in data["models"].get(shape, {}):
                    continue
                load = latency.load_average()
                print(f"{shape} {variant} ({time.strftime('%H:%M:%S')}, load {latency.load_average()})", flush=True)
                part = Path(parts) / f"{shape}-{variant}.json"
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker",
                                f"variant:{shape}:{fraction}:{part}"], check=True)
                done = json.loads(part.read_text())
                results, cost, timings = done["results"], done["cost"], done["timings"]
                profile = timings.pop("profile", None)
                if profile:
                    data["profiles"][f"{shape} {variant}"] = profile
                data["results"] += results
                data["models"].setdefault(shape, {})[variant] = cost
                data["timings"][f"{shape} {variant}"] = {**timings, "load_average": load}
                data["comparisons"] = suite_comparisons(data)
                data["target"] = target_summary(data)
                data["machine"]["load_average_end"] = latency.load_average()
                write(data, args.out, args.name)
            if args.ab and shape not in data.setdefault("ab", {}):
                print(f"{shape} interleaved A/B at {args.ab_slices} ({time.strftime('%H:%M:%S')})", flush=True)
                part = Path(parts) / f"{shape}-ab.json"
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker",
                                f"ab:{shape}:{args.ab_slices}:{part}"], check=True)
                data["ab"][shape] = json.loads(part.read_text())
                data["machine"]["load_average_end"] = latency.load_average()
                data["target"] = target_summary(data)
                write(data, args.out, args.name)
    data["comparisons"] = suite_comparisons(data)
    data["target"] = target_summary(data)
    write(data, args.out, args.name)  # also re-renders a merged file when nothing was left to measure
    print(json.dumps(data["target"], indent=2))
    print(f"wrote {args.out / args.name}.json/.md/_*.png")


def merge_previous(data: dict, old: dict) -> dict:
    """Carry over the measured variants of an earlier run made with the same measurement options."""
    if old.get("schema") != SCHEMA or old.get("config") != json.loads(json.dumps(data["config"])):
        raise SystemExit(f"--merge: the existing results were made with other options ({old.get('config')}); "
                         "rerun them or use another --name")
    for key in ("results", "timings", "profiles", "ab"):
        data[key] = old.get(key, data[key])
    data["shapes"] = {**old["shapes"], **data["shapes"]}
    data["models"] = {**{s: {} for s in data["shapes"]}, **old["models"]}
    data["machine"]["load_average"] = old["machine"]["load_average"]
    data["machine"]["load_average_end"] = old["machine"].get("load_average_end")
    return data


def worker_tick() -> None:
    print(f"  measured one at {time.strftime('%H:%M:%S')}, load {latency.load_average()}", flush=True)


def suite_comparisons(data: dict) -> list[dict]:
    """bench_report.compare per shape (variants are only compared with their own shape's dense)."""
    rows = []
    for shape, models in data["models"].items():
        fields = latency.ModelCost.__dataclass_fields__
        costs = {name: latency.ModelCost(**{k: v for k, v in cost.items() if k in fields})
                 for name, cost in models.items()}
        for row in bench_report.compare([r for r in data["results"] if r["model_label"] == shape], costs):
            rows.append({"model_label": shape, **row})
    return rows


if __name__ == "__main__":
    main()
