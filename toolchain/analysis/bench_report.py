"""The latency report of a benchmark: its JSON skeleton, the ideal-vs-measured comparison, the
Markdown rendering and the published report dir (latency.json, latency.md and the PNG plots).

The JSON's top level doubles as the bench schema of `toolchain.analysis.roofline.fit_efficiency` (gpu, dtype,
n_gpus, results[phase, measured_ms, batch, tokens, context, dtype, model]), so a GPU run can be fed to
`toolchain plan --calibrate`.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

from toolchain.core.errors import OutputPathError
from toolchain.core.fileio import atomic_dir
from toolchain.core.reports import write_report as write_json_and_markdown
from toolchain.core.versions import library_versions

from runtime.latency import RESULT_KEYS, BenchConfig, ModelCost, load_average, machine_info

from toolchain.analysis import bench_plots

SCHEMA = "toolchain.latency/1"
STEM = "latency"
JSON_FILE, MARKDOWN_FILE = f"{STEM}.json", f"{STEM}.md"
TOP_KEYS = ("schema", "created", "build", "provider", "gpu", "dtype", "n_gpus", "machine", "versions", "config",
            "models", "results", "comparisons", "skipped")
COMPARISON_KEYS = ("backend", "variant", "phase", "batch", "tokens", "context", "dense_ms", "sliced_ms",
                   "latency_ratio", "speedup", "ideal_ratio", "ideal_speedup", "gap_pct", "weight_bytes_ratio",
                   "read_bytes_ratio", "flops_ratio", "verdict")
__all__ = ["COMPARISON_KEYS", "RESULT_KEYS", "TOP_KEYS", "compare", "finish_report", "new_report",
           "render_markdown", "write_report"]


def new_report(build: str | None, provider: str, dtype: str, config: BenchConfig) -> dict:
    """The JSON skeleton, keys in TOP_KEYS order."""
    import torch

    gpu = torch.cuda.get_device_name() if provider != "cpu" and torch.cuda.is_available() else None
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build": build, "provider": provider, "gpu": gpu, "dtype": dtype, "n_gpus": 1,
            "machine": machine_info(), "versions": library_versions(), "config": asdict(config), "models": {},
            "results": [], "comparisons": [], "skipped": []}


def finish_report(data: dict, costs: dict[str, ModelCost]) -> dict:
    data["models"] = {name: cost.as_dict() for name, cost in costs.items()}
    data["comparisons"] = compare(data["results"], costs)
    data["machine"]["load_average_end"] = load_average()
    return data


def _ratio(new: float, old: float) -> float | None:
    return new / old if old else None


def compare(results: list[dict], costs: dict[str, ModelCost], dense: str = "dense") -> list[dict]:
    """For every non-dense variant and backend measured on both: the measured latency ratio
    (variant/dense, < 1 is faster) next to the ideal one — bytes streamed for decode, FLOPs for
    prefill — so a slice that is slower in practice shows as such (COMPARISON_KEYS)."""
    index = {(r["backend"], r["variant"], r["phase"], r["batch"], r["tokens"]): r for r in results}
    rows = []
    for r in results:
        variant = r["variant"]
        base = index.get((r["backend"], dense, r["phase"], r["batch"], r["tokens"]))
        if variant == dense or base is None or variant not in costs or dense not in costs:
            continue
        cost, dense_cost, dtype = costs[variant], costs[dense], r["dtype"]
        if r["phase"] == "decode":
            dense_ms, ms = base["p50_ms"], r["p50_ms"]  # per token
            middle = r["context"] + r["tokens"] // 2
            ideal = _ratio(cost.decode_bytes(dtype, r["batch"], middle),
                           dense_cost.decode_bytes(dtype, r["batch"], middle))
        else:
            dense_ms, ms = base["measured_ms"], r["measured_ms"]
            ideal = _ratio(cost.forward_flops(r["batch"], r["tokens"], 0),
                           dense_cost.forward_flops(r["batch"], r["tokens"], 0))
        ratio = ms / dense_ms
        gap = (ratio / ideal - 1) * 100 if ideal else None
        rows.append({
            "backend": r["backend"], "variant": variant, "phase": r["phase"], "batch": r["batch"],
            "tokens": r["tokens"], "context": r["context"], "dense_ms": dense_ms, "sliced_ms": ms,
            "latency_ratio": ratio, "speedup": dense_ms / ms, "ideal_ratio": ideal,
            "ideal_speedup": 1 / ideal if ideal else None, "gap_pct": gap,
            "weight_bytes_ratio": _ratio(cost.params, dense_cost.params),
            "read_bytes_ratio": _ratio(cost.read_params, dense_cost.read_params),
            "flops_ratio": _ratio(cost.flops_per_token, dense_cost.flops_per_token),
            "verdict": _verdict(ratio, gap),
        })
    return rows


def _verdict(ratio: float, gap: float | None) -> str:
    if ratio >= 1.0:
        return "SLOWER than dense"
    if gap is None or abs(gap) <= 10:
        return "as predicted"
    return "short of ideal" if gap > 0 else "better than ideal"


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def render_markdown(data: dict, title: str = "Latency") -> str:
    machine = data["machine"]
    lines = [f"# {title}", "",
             f"{data['build'] or ''} — provider {data['provider']}, {machine['cpu']} ({machine['cpu_count']} "
             f"cores, torch threads {machine['torch_threads']}), load average at start/end "
             f"{machine.get('load_average')} / {machine.get('load_average_end')}; onnxruntime "
             f"{data['versions'].get('onnxruntime', '-')}, torch {data['versions'].get('torch', '-')}.", "",
             *_timing_notes(data),
             "## Models (counted from their parameters)", "",
             "| variant | params | weight MB fp32 | streamed/forward MB fp32 | stored MB (quantized) "
             "| shortcut params | GFLOPs/token |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cost in data["models"].items():
        stored = f"{cost['stored_bytes'] / 1e6:,.1f}" if cost.get("stored_bytes") is not None else "-"
        lines.append(f"| {name} | {cost['params']:,} | {cost['weight_bytes_fp32'] / 1e6:,.1f} | "
                     f"{cost['read_bytes_fp32'] / 1e6:,.1f} | {stored} | {cost['shortcut_params']:,} | "
                     f"{cost['flops_per_token'] / 1e9:.3f} |")
    lines += ["", "## Measured", "",
              "Prefill: time to first token (median of repeats). Decode: per-token latency over the timed steps; "
              "context = cached tokens before the first timed step. Peak memory: "
              f"{data['results'][0]['memory_kind'] if data['results'] else '-'} during that measurement.", "",
              "| backend | variant | phase | batch | prompt / context | p50 ms | p90 ms | p99 ms | tokens/s "
              "| peak MB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        where = r["tokens"] if r["phase"] == "prefill" else r["context"]
        lines.append(f"| {r['backend']} | {r['variant']} | {r['phase']} | {r['batch']} | {where} | "
                     f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | "
                     f"{_fmt(r['tokens_per_s'])} | {_fmt(r['peak_memory_mb'], 0)} |")
    if data["comparisons"]:
        lines += ["", "## Ideal vs measured (variant / dense; < 1 is faster)", "",
                  "Ideal: bytes streamed per step (weights + KV) for decode, FLOPs for prefill. "
                  "gap = measured ratio / ideal ratio − 1.", "",
                  "| backend | variant | phase | batch | prompt / context | weight bytes | FLOPs/token | ideal "
                  "| measured | "
                  "speedup | gap | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in data["comparisons"]:
            verdict = f"**{c['verdict']}**" if c["verdict"] != "as predicted" else c["verdict"]
            where = c["tokens"] if c["phase"] == "prefill" else c["context"]
            lines.append(f"| {c['backend']} | {c['variant']} | {c['phase']} | {c['batch']} | {where} | "
                         f"{_fmt(c['weight_bytes_ratio'], 3)} | {_fmt(c['flops_ratio'], 3)} | "
                         f"{_fmt(c['ideal_ratio'], 3)} | {_fmt(c['latency_ratio'], 3)} | {_fmt(c['speedup'], 2)}x | "
                         f"{_fmt(c['gap_pct'], 1)} % | {verdict} |")
    if data["skipped"]:
        lines += ["", "## Not measured", ""] + [f"- {s['backend']} ({s['variant']}): {s['reason']}"
                                               for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def _timing_notes(data: dict) -> list[str]:
    """How the variants were timed, and the load warning when the machine's load moved."""
    machine, lines = data["machine"], []
    if data["config"].get("interleave"):
        lines.append("The variants of each backend were timed in turns (dense and compressed calls alternating, "
                     "the order reversed every round), so load that comes and goes affects both sides of a ratio.")
    if machine.get("load_samples"):
        lines.append("1-minute load average at the start, after each backend and at the end: "
                     + ", ".join(f"{s[0]:.2f}" if s else "-" for s in (*machine["load_samples"],
                                                                         machine.get("load_average_end"))) + ".")
    if machine.get("load_warning"):
        lines.append(f"**Warning: {machine['load_warning']}.**")
    return [line for text in lines for line in (text, "")]


def write_report(data: dict, out_dir: str | Path, title: str = "Latency") -> dict[str, Path]:
    """latency.json, latency.md and the PNG plots, published together (atomic dir); paths by file name."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / JSON_FILE).is_file()):
        raise OutputPathError(f"--out {out_dir} exists and is not a latency report dir; choose a new directory")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json_and_markdown(tmp, data, lambda d: render_markdown(d, title), STEM)
        plots = bench_plots.plot_all(data, tmp)
    names = [JSON_FILE, MARKDOWN_FILE, *(p.name for p in plots)]
    return {name: out_dir / name for name in names}
