"""`toolchain export` and `toolchain validate`: ONNX with KV cache, and its parity."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import VERBOSE_OPTION, app, user_errors
from toolchain.core.errors import InvalidOptionError


@app.command("export")
@user_errors
def export_command(
    model: str = typer.Argument(..., help="Sliced/canonical model dir, build dir (uses its sliced/), HF checkpoint "
                                          "dir or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist)."),
    target: str = typer.Option("onnx", "--target", help="onnx (KV-cache graph with optimum/genai I/O names)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 (norms, RoPE, softmax and logits stay fp32)."),
    optimize: str = typer.Option("fast", "--optimize", help="fast: ORT's fused ops (GroupQueryAttention, "
                                 "RotaryEmbedding, SkipSimplifiedLayerNormalization), checked against torch, falling "
                                 "back to basic where they cannot be exact; basic: the traced graph with ORT's norm "
                                 "fusion; none: standard ONNX ops only (e.g. for other runtimes)."),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="Same as --optimize none."),
    external_data: bool = typer.Option(False, "--external-data",
                                       help="Weights in model.onnx.data (automatic past ~1.8 GB)."),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo | torchscript (fallback if dynamo fails)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Export a model to ONNX with a KV cache (one graph for prefill and decode)."""
    from exporters.onnx import ExportOptions, export_onnx
    from toolchain.app.model_card import write_model_card

    if target != "onnx":
        raise InvalidOptionError(f"--target {target!r} is not supported by `export`; use --target onnx")
    from toolchain.app.api import export_source

    result = export_onnx(export_source(model), out, ExportOptions(dtype=dtype, optimize="none" if no_optimize else optimize,
                                                    external_data=external_data, exporter=exporter))
    write_model_card(result.out_dir)  # README.md, from the export's reports
    report = result.report
    graph = report.get("graph", {})
    fallback = f" (fell back: {graph['fallback_reason']})" if graph.get("fallback_reason") else ""
    Console().print(f"wrote {result.model_path} ({dtype}, opset {result.config['opset']}, {graph.get('kind', '?')} "
                    f"graph{fallback}); fused norms {report['fused_norms']}/{report['model_norms']}", highlight=False)


@app.command("validate")
@user_errors
def validate_command(
    paths: list[str] = typer.Argument(..., help="A build dir (with sliced/ and onnx/), or REFERENCE CANDIDATE: "
                                                "each a torch model dir or an ONNX file/export dir."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Tolerances: fp32 | fp16 (default: from the "
                                                              "candidate's KV-cache dtype)."),
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu | cuda | tensorrt."),
    report: Optional[Path] = typer.Option(None, "--report", help="Dir for parity.json and parity.md (default: "
                                                                 "<build>/reports, or ./reports for two paths)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Parity of an export against its torch model; exit 0 on pass, 1 on fail (for CI)."""
    from rich.table import Table

    from runtime.sessions import provider_name
    from runtime.validate import validate

    provider_name(provider)  # a mistyped option is reported before a missing path
    result = validate(paths, dtype=dtype, provider=provider, report_dir=report)
    data = result.report
    table = Table("step", "max abs", "mean abs", "cosine", "top-1", "top-5",
                  title=f"{data['candidate']} vs {data['reference']} ({data['dtype']}): logits")
    for step in data["steps"]:
        m = step["logits"]
        table.add_row(step["step"], f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['cosine']:.6f}",
                      f"{m['top1']:.3f}", f"{m['top5']:.3f}")
    out = Console()
    out.print(table)
    for check in data["checks"]:
        out.print(f"{'pass' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']} "
                  f"(limit {check['limit']})", highlight=False)
    out.print(f"{'PASS' if result.passed else 'FAIL'} — report: {result.json_path} and {result.markdown_path}",
              highlight=False)
    if not result.passed:
        raise typer.Exit(1)
