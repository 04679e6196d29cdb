"""Plans as text: the summary line, the GPU table (CLI and Markdown) and the Markdown report."""

from __future__ import annotations

from toolchain.analysis.roofline.estimate import Plan
from toolchain.analysis.roofline.gpus import GiB

def _gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if value < 1e4 else f"{value:,.0f}"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def compressed_label(settings: dict, short: bool = False) -> str:
    """'sliced 30%' / 'sliced at 30% (--tie slice, --share none)', MoDeGPT's fraction appended."""
    method = settings.get("method") or "slicegpt"
    parts = []
    if "slicegpt" in method:
        parts.append(f"sliced {settings['slice']:.0%}" if short else f"sliced at {settings['slice']:.0%}")
    if "modegpt" in method:
        parts.append(f"modegpt {settings['compression']:.0%}")
    label = " + ".join(parts)
    if short or "slicegpt" not in method:
        return label
    return f"{label} (--tie {settings.get('tie', 'slice')}, --share {settings.get('share', 'none')})"


def summary_line(data: dict) -> str:
    """One sentence: the model, dense vs sliced parameters, settings."""
    m, s, v = data["model"], data["settings"], data["variants"]
    dense, sliced = v["dense"], v["sliced"]
    head = f"{m['name']} ({m['arch']})"
    if dense is None:
        body = (f"already sliced: {fmt_params(sliced['params']['total'])} params "
                f"(widths up to {sliced['residual_width']})")
    else:
        ratio = data["ratios"]["params"]
        body = (f"{fmt_params(dense['params']['total'])} params dense -> {fmt_params(sliced['params']['total'])} "
                f"{compressed_label(s)} (d={sliced['residual_width']} of {m['hidden_size']}, "
                f"head {sliced['head_width']}; x{ratio:.3f} incl. shortcuts and embeddings)")
    return f"{head}: {body}; {s['dtype']}, batch {s['batch']}, context {s['context']}"


def table_rows(data: dict) -> list[list[str]]:
    """Rows shared by the Markdown and the CLI table."""
    rows = []
    for row in data["gpus"]:
        for name in ("dense", "sliced"):
            est, var = row[name], data["variants"][name]
            if est is None:
                continue
            label = name if name == "dense" or data["settings"].get("method") is None else \
                compressed_label(data["settings"], short=True)
            rows.append([row["gpu"]["name"], label, _gib(var["weight_bytes"]), _gib(est["need_bytes"]),
                         "yes" if est["fits"] else "no", str(est["n_gpus"]),
                         f"{_num(est['prefill_ms'])} ({est['prefill_bound'][0]})",
                         f"{_num(est['decode_ms'], 2)} ({est['decode_bound'][0]})",
                         _num(est["decode_tokens_per_s"])])
    return rows


TABLE_HEADER = ["GPU", "model", "weights GiB", "need GiB", "fits 1 GPU", "#GPUs", "prefill ms",
                "decode ms/tok", "tok/s"]


def render_markdown(plan_or_dict: Plan | dict) -> str:
    data = plan_or_dict.to_dict() if isinstance(plan_or_dict, Plan) else plan_or_dict
    lines = ["# Plan: will it fit, how fast at best", "", summary_line(data), ""]
    cal = data["calibration"]
    if cal:
        lines += [f"Calibrated on {cal['gpu']}: compute efficiency {cal['compute']:.2f} "
                  f"({cal['prefill_samples']} prefill runs), bandwidth efficiency {cal['bandwidth']:.2f} "
                  f"({cal['decode_samples']} decode runs), applied to every GPU below.", ""]
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(data)]
    lines += ["", "(c) compute-bound, (m) memory-bandwidth-bound. #GPUs: memory-driven count; the times assume "
              "that many GPUs with ideal tensor parallelism.", "", "## Parameters", "",
              "| group | dense | sliced |", "|---|---|---|"]
    dense, sliced = data["variants"]["dense"], data["variants"]["sliced"]
    for group in ("embeddings", "blocks", "shortcuts", "lm_head", "total"):
        cells = [f"{v['params'][group]:,}" if v else "-" for v in (dense, sliced)]
        lines.append(f"| {group} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Assumptions", ""] + [f"- {a}" for a in data["assumptions"]]
    lines += ["", "## GPU specs", ""] + [f"- {row['gpu']['name']}: {row['gpu']['source']}" for row in data["gpus"]]
    return "\n".join(lines) + "\n"
