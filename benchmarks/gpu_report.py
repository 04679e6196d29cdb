"""The GPU suite's report: reads what benchmarks/gpu_suite.py's steps wrote and writes
gpu_suite.json, gpu_suite.md and plots into the results dir (default benchmarks/results/gpu).

    python benchmarks/gpu_report.py [--results benchmarks/results/gpu] [--work <results>/builds]

Inputs (each optional; what is missing is listed, never invented): steps.json (the run), the builds'
reports/parity/parity.json (ORT-CUDA parity from the build's validate stage), parity/<variant>-tensorrt/
(the engines), bench/<variant>/latency.json, plan/<dtype>-b<batch>-c<context>.json. Every fp16/int4
measurement is set against `toolchain plan`'s lower bound for the same GPU, batch and length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpu_suite import DECODE_CONTEXT, RESULTS, STEPS_FILE, VARIANTS

from toolchain.analysis import bench_plots
from toolchain.core.fileio import write_json, write_text

SCHEMA = "toolchain.gpu_suite/1"
JSON_FILE, MARKDOWN_FILE, PLAN_PNG = "gpu_suite.json", "gpu_suite.md", "gpu_vs_plan.png"
# (suite build, bench variant) -> (plan dtype, plan variant): which prediction a measurement is held to.
# The dense and int4 builds use --method none, so their model is the plan's dense one.
PLAN_OF = {("dense", "sliced"): ("fp16", "dense"), ("sliced", "sliced"): ("fp16", "sliced"),
           ("sliced", "dense"): ("fp16", "dense"), ("int4", "sliced-int4"): ("int4", "dense")}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(results: Path, work: Path) -> dict:
    missing: list[str] = []

    def need(path: Path) -> dict | None:
        data = _load(path)
        if data is None:
            missing.append(str(path))
        return data

    run = need(results / STEPS_FILE) or {}
    parity = []
    for variant in VARIANTS:
        for backend, path in (("onnxruntime-cuda", work / variant / "reports" / "parity" / "parity.json"),
                              ("tensorrt", results / "parity" / f"{variant}-tensorrt" / "parity.json")):
            if backend == "tensorrt" and variant == "int4":
                continue  # int4 has no TensorRT output
            report = need(path)
            if report is not None:
                logits = report.get("summary", {}).get("logits", {})
                parity.append({"build": variant, "backend": backend, "candidate": report.get("candidate"),
                               "passed": report.get("passed"), "top1": logits.get("top1"),
                               "cosine": logits.get("cosine"), "max_abs": logits.get("max_abs")})
    rows, skipped, load = [], [], {}
    for variant in VARIANTS:
        bench = need(results / "bench" / variant / "latency.json")
        if bench is None:
            continue
        rows += [{**r, "build": variant, "model_label": variant} for r in bench.get("results", [])]
        skipped += [{**s, "build": variant} for s in bench.get("skipped", [])]
        machine = bench.get("machine", {})
        load[variant] = {"start": machine.get("load_average"), "end": machine.get("load_average_end")}
    plans = {path.stem: data for path in sorted((results / "plan").glob("*.json")) if (data := _load(path))}
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": run.get("environment"),
            "suite_seconds": run.get("seconds"), "suite_estimate_s": run.get("estimate_s"), "steps": run.get("steps", []),
            "parity": parity, "results": rows, "skipped": skipped, "load": load,
            "plan_comparison": compare_with_plan(rows, plans), "missing": missing}


def compare_with_plan(rows: list[dict], plans: dict[str, dict]) -> list[dict]:
    """measured p50 / the plan's lower bound, for fp16 and int4 measurements whose plan exists for exactly
    one GPU (the detected one). Decode is held to the plan at the bench's starting context."""
    out = []
    for r in rows:
        key = PLAN_OF.get((r["build"], r["variant"]))
        if key is None or r.get("dtype") not in ("fp16", "int4"):
            continue  # torch eager runs fp32, which the plan for fp16 weights does not describe
        dtype, plan_variant = key
        context = r["tokens"] if r["phase"] == "prefill" else DECODE_CONTEXT
        plan = plans.get(f"{dtype}-b{r['batch']}-c{context}")
        if not plan or len(plan.get("gpus", [])) != 1:
            continue
        gpu = plan["gpus"][0]
        predicted = gpu[plan_variant][f"{r['phase']}_ms"]
        measured = r.get("p50_ms")
        out.append({"build": r["build"], "backend": r["backend"], "variant": r["variant"], "phase": r["phase"],
                    "batch": r["batch"], "tokens": r["tokens"], "gpu": gpu["gpu"]["name"], "plan_dtype": dtype,
                    "plan_variant": plan_variant, "measured_ms": measured, "plan_ms": predicted,
                    "bound": gpu[plan_variant][f"{r['phase']}_bound"],
                    "x_of_bound": measured / predicted if measured and predicted else None})
    return out


def to_markdown(data: dict, plots: list[Path]) -> str:
    env = data.get("environment") or {}
    head = (f"GPU: {env.get('gpu') or 'none detected'}; suite time {data.get('suite_seconds')} s (estimate "
            f"{data.get('suite_estimate_s')} s).")
    lines = ["# GPU suite", "", head, ""]
    lines += [f"- found {part}: {what}" for part, what in (env.get("found") or {}).items()]
    lines += [f"- missing {part}: {why}" for part, why in (env.get("missing") or {}).items()]
    lines += ["", "## Steps", "", "| step | status | seconds | estimate | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s['estimate_s']} | {s.get('reason', '')} |"
              for s in data["steps"]]
    lines += ["", "## Parity (fp16 tolerances, against torch fp32)", "",
              "| build | backend | passed | top-1 | cosine | max abs |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['build']} | {p['backend']} | {p['passed']} | {_num(p['top1'], 3)} | {_num(p['cosine'], 5)} | "
              f"{_num(p['max_abs'], 3)} |" for p in data["parity"]]
    lines += ["", "## Latency against `toolchain plan`'s lower bound", "",
              "| build | backend | variant | phase | batch | tokens | p50 ms | plan ms (bound) | x of bound |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['build']} | {c['backend']} | {c['variant']} | {c['phase']} | {c['batch']} | {c['tokens']} | "
              f"{_num(c['measured_ms'], 2)} | {_num(c['plan_ms'], 3)} ({c['bound']}) | {_num(c['x_of_bound'], 1)} |"
              for c in data["plan_comparison"]]
    if data["skipped"]:
        lines += ["", "Not measured: " + "; ".join(f"{s['build']} {s['backend']} {s['variant']}: {s['reason']}"
                                                  for s in data["skipped"])]
    if data["missing"]:
        lines += ["", "Inputs not found (their steps did not run or failed): " + ", ".join(data["missing"])]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(lines)


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def plot_vs_plan(comparisons: list[dict], path: Path) -> Path | None:
    rows = [c for c in comparisons if c["x_of_bound"]]
    if not rows:
        return None
    plt = bench_plots._pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4.5))
    labels = [f"{c['build']} {c['backend']} {c['phase']} b{c['batch']} t{c['tokens']}" for c in rows]
    ax.bar(range(len(rows)), [c["x_of_bound"] for c in rows], color=["C0" if c["phase"] == "decode" else "C1"
                                                                      for c in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=6)
    ax.set(yscale="log", ylabel="measured p50 / plan's lower bound", title="Measured latency against the plan")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return bench_plots._save(fig, path, plt)


def write(results: Path, work: Path) -> dict:
    data = collect(results, work)
    plots = [p for p in (bench_plots.plot_prefill(data["results"], results / "gpu_prefill.png"),
                         bench_plots.plot_decode(data["results"], results / "gpu_decode.png"),
                         plot_vs_plan(data["plan_comparison"], results / PLAN_PNG)) if p is not None]
    data["plots"] = [p.name for p in plots]
    write_json(results / JSON_FILE, data)
    write_text(results / MARKDOWN_FILE, to_markdown(data, plots))
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=None, help="the suite's build dirs (default <results>/builds)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = write(args.results, args.work or args.results / "builds")
    print(f"wrote {args.results / JSON_FILE} and {args.results / MARKDOWN_FILE} ({len(data['plan_comparison'])} "
          f"measurements against the plan; {len(data['missing'])} inputs missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
