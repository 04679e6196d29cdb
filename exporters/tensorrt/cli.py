"""`python -m exporters.tensorrt {build,check,validate}`, mounted as `toolchain trt`. Importing this
module loads no torch, onnx or tensorrt (`toolchain --help` imports it): each command imports its
heavy modules when it runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from toolchain.core.errors import ToolchainError


cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TensorRT bundles: build the engine on the target GPU, check and validate a bundle.")


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except ToolchainError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None


@cli.command("build")
def build_cli(bundle: Path = typer.Argument(..., help="A bundle dir written by write_bundle / --target trt."),
              out: Optional[Path] = typer.Option(None, "--out", help="Engine dir (default: <bundle>/engine)."),
              workspace_gb: Optional[float] = typer.Option(None, "--workspace-gb", help="Builder workspace limit."),
              verbose: bool = typer.Option(False, "--verbose", help="TensorRT's verbose builder log.")) -> None:
    """Build the engine from a bundle (needs TensorRT and a CUDA GPU; exits 2 with the reason otherwise)."""
    from exporters.tensorrt.engine import build_engine

    with _one_line_errors():
        result = build_engine(bundle, out, workspace_gb, verbose)
    typer.echo(f"built {result.engine_path} ({result.engine_path.stat().st_size / 2**20:.1f} MiB) in "
               f"{result.seconds:.0f}s for {result.metadata['gpu']} (TensorRT {result.metadata['tensorrt']})")


@cli.command("check")
def check_cli(bundle: Path = typer.Argument(..., help="A bundle dir.")) -> None:
    """Static check: every op/type in TensorRT's parser list, profiles cover every dynamic dim."""
    from exporters.tensorrt.bundle import check_bundle

    with _one_line_errors():
        report = check_bundle(bundle)
    typer.echo(report.summary())
    for problem in report.problems:
        typer.echo(f"  {problem.kind}: {problem.message}")
    if not report.passed:
        raise typer.Exit(1)


@cli.command("validate")
def validate_cli(bundle: Path = typer.Argument(..., help="A bundle dir (with engine/ for --backend tensorrt)."),
                 backend: str = typer.Option("tensorrt", "--backend", help="tensorrt | onnxruntime (the bundle's "
                                                                             "fp16 ONNX on ORT)."),
                 provider: str = typer.Option("cpu", "--provider", help="ORT provider for --backend onnxruntime."),
                 report: Optional[Path] = typer.Option(None, "--report", help="Dir for parity.json/.md.")) -> None:
    """Replay the bundle's parity inputs and compare with the stored torch outputs; exit 1 on failure."""
    from runtime.trt_session import validate_bundle

    with _one_line_errors():
        result = validate_bundle(bundle, backend=backend, provider=provider, report_dir=report)
    logits = result["summary"]["logits"]
    typer.echo(f"{'PASS' if result['passed'] else 'FAIL'} {result['candidate']} vs stored torch fp32: top-1 "
               f"{logits['top1']:.3f}, cosine {logits['cosine']:.5f}, max abs {logits['max_abs']:.3g}")
    if not result["passed"]:
        raise typer.Exit(1)
