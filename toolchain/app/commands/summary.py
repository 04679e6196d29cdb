"""What `toolchain build` (and `inspect`) prints at the end: the stages, the parameter table, parity,
then the headline read from the reports (toolchain.analysis.headline)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolchain.analysis.headline import Headline, read_headline
from toolchain.app.commands.common import print_parameter_table
from toolchain.core.build_dirs import model_dir


def print_build_summary(build_dir: Path, manifest: dict) -> None:
    out = Console()
    table = Table(title=f"build {build_dir}")
    for column in ("stage", "status", "seconds", "files"):
        table.add_column(column)
    for name, record in manifest["stages"].items():
        table.add_row(name, record.get("status", "?"), str(record.get("seconds", "")), str(len(record.get("outputs", {}))))
    out.print(table)
    for name, record in manifest["stages"].items():
        if record.get("note"):
            out.print(f"{name}: {record['note']}", highlight=False, soft_wrap=True)
    report = model_dir(build_dir) / "compression_report.json"
    if report.exists():
        print_parameter_table("parameters", json.loads(report.read_text())["parameters"])
    parity = build_dir / "reports" / "parity" / "parity.json"
    if parity.exists():
        data = json.loads(parity.read_text())
        logits = data["summary"]["logits"]
        out.print(f"parity {data['candidate']} vs {data['reference']}: {'PASS' if data['passed'] else 'FAIL'} "
                  f"(logits max abs {logits['max_abs']:.2e}, top-1 {logits['top1']:.3f})", highlight=False)
    print_headline(read_headline(build_dir, manifest))


def headline_lines(headline: Headline) -> list[str]:
    """Plain lines (no table: they stay readable in a narrow terminal and in a CI log)."""
    lines = []
    if headline.latency:
        lines.append("latency, p50 (ratio = compressed / dense, < 1 is faster; ideal from the bytes read per token "
                     "for decode, FLOPs for TTFT):")
        for r in headline.latency:
            what = (f"decode ms/token, batch {r.batch}" if r.phase == "decode"
                    else f"TTFT ms, {r.tokens}-token prompt")
            ideal = f"{r.ideal_ratio:.2f}x" if r.ideal_ratio is not None else "-"
            lines.append(f"  {r.backend} {r.variant}: {what}: dense {_ms(r.dense_ms)} -> {_ms(r.ms)} "
                         f"= {r.ratio:.2f}x (ideal {ideal})")
    if headline.perplexity is not None:
        p = headline.perplexity
        lines.append(f"perplexity on {p.dataset} ({p.windows} x {p.seqlen} tokens): dense {p.dense:.2f} -> "
                     f"compressed {p.compressed:.2f} ({(p.compressed / p.dense - 1) * 100:+.1f} %)")
    if headline.quantized is not None:
        q = headline.quantized
        lines.append(f"{q.mode} vs fp32 ({q.inputs}): perplexity {q.ppl_fp32:.2f} -> {q.ppl_quantized:.2f}, "
                     f"top-1 agreement {q.top1:.3f}")
    if headline.sizes:
        lines.append("size on disk: " + ", ".join(f"{name}/ {_mb(size)}" for name, size in headline.sizes.items()))
    if headline.reports:
        lines.append(f"reports in {headline.build}: " + ", ".join(str(p.relative_to(headline.build))
                                                                for p in headline.reports))
    return lines


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 / 10 else f"{size / 2**10:,.0f} KB"


def print_headline(headline: Headline) -> None:
    out = Console()
    for line in headline_lines(headline):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
