"""`toolchain bench`: latency of a build next to its dense source."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import VERBOSE_OPTION, app, stage_progress, user_errors


@app.command("bench")
@user_errors
def bench_command(
    build_dir: Path = typer.Argument(..., help="A build directory (sliced/ and onnx/)."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt (ORT provider; torch uses CUDA "
                                                           "when it is not cpu)."),
    prompts: str = typer.Option("128,512,2048", "--prompts", help="Prefill prompt lengths, comma-separated "
                                                                  "(capped by the model's positions)."),
    batches: str = typer.Option("1,8", "--batches", help="Decode batch sizes, comma-separated."),
    steps: int = typer.Option(20, "--steps", help="Timed decode steps per batch size (after --warmup)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed decode steps first."),
    repeats: int = typer.Option(3, "--repeats", help="Timed prefills per prompt length (median reported)."),
    context: int = typer.Option(128, "--context", help="Cached tokens before the first decode step."),
    max_prompt: Optional[int] = typer.Option(None, "--max-prompt", help="Cap on prompt lengths."),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Also measure the dense source model."),
    torch_only: bool = typer.Option(False, "--torch-only", help="Torch eager only (builds without onnx/)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch and ORT intra-op threads (default: theirs)."),
    quantized: Optional[bool] = typer.Option(None, "--quantized/--no-quantized", help="Also measure the build's "
                                             "int4/int8 graph (default: when the build has quantized/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report dir (default <build>/reports/latency)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Latency of a build's sliced model next to its dense source: TTFT, decode p50/p90/p99, tokens/s, memory."""
    from toolchain.app.bench import bench_build

    out = out or build_dir / "reports" / "latency"
    with stage_progress("bench") as progress:
        result = bench_build(build_dir, out, provider=provider, prompts=prompts, batches=batches, steps=steps,
                             warmup=warmup, repeats=repeats, context=context, max_prompt=max_prompt, dense=dense,
                             torch_only=torch_only, threads=threads, quantized=quantized, progress=progress)
    table_out = Console(width=160) if not Console().is_terminal else Console()
    table_out.print(result.markdown_path.read_text(), highlight=False, markup=False)
    table_out.print(f"report: {', '.join(str(p) for p in result.paths.values())}", highlight=False)
