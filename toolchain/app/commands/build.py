"""`toolchain build` and `toolchain inspect`: the resumable pipeline and its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import (BLOCK_SIZE_OPTION, QUANT_ALGORITHM_OPTION, QUANT_COMPUTE_OPTION, QUANTIZE_EMBEDDINGS_OPTION,
                                           RESIDUAL_BITS_OPTION, VERBOSE_OPTION, app, console, stage_progress,
                                           user_errors)
from toolchain.app.commands.schema import schema_options
from toolchain.app.commands.summary import print_build_summary
from toolchain.compress.options import CompressOptions, RecoverOptions


@app.command("build")
@user_errors
@schema_options(CompressOptions, into="values")
@schema_options(RecoverOptions, into="recover_values")
def build_command(
    out: Path = typer.Option(..., "--out", "-o", help="Build directory (created; an existing build resumes)"),
    target: str = typer.Option("onnx", help="torch | onnx | trt"),
    dtype: str = typer.Option("fp32", help="ONNX precision: fp32 | fp16"),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider for validate/bench: cpu | cuda | tensorrt"),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Run the latency benchmark stage"),
    eval_: Optional[str] = typer.Option(None, "--eval", help="Also measure perplexity (dense vs compressed) on this text"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int4 | int8: weight-only quantize the fp32 "
                                                                     "ONNX export into quantized/ (onnxruntime's "
                                                                     "MatMulNBits), with parity vs fp32"),
    block_size: int = BLOCK_SIZE_OPTION,
    quant_algorithm: str = QUANT_ALGORITHM_OPTION,
    quant_compute: str = QUANT_COMPUTE_OPTION,
    quantize_embeddings: bool = QUANTIZE_EMBEDDINGS_OPTION,
    residual_bits: int = RESIDUAL_BITS_OPTION,
    deploy: Optional[str] = typer.Option(None, "--deploy", help="genai | triton: package the (quantized) export "
                                                                 "under deploy/ for onnxruntime-genai or Triton"),
    force: bool = typer.Option(False, "--force", help="Redo every stage"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output"),
    json_log: bool = typer.Option(False, "--json", help="Machine-readable JSON log lines on stdout"),
    verbose: bool = VERBOSE_OPTION,
    values: dict = None,  # the compression options, from the schema
    recover_values: dict = None,  # the recovery options, from the schema
) -> None:
    """Compress, export, validate and benchmark in one resumable build directory."""
    import json
    import time

    from toolchain.app.pipeline import BuildOptions, build

    options = BuildOptions(**values, **recover_values, target=target, dtype=dtype, provider=provider, bench=bench, eval=eval_,
                           quantize=quantize, block_size=block_size, quant_algorithm=quant_algorithm,
                           quant_compute=quant_compute, quantize_embeddings=quantize_embeddings,
                           residual_bits=residual_bits, deploy=deploy)

    progress = None  # the bar, when one is shown: each stage gets it in turn

    def on_stage(name: str, event: str) -> None:
        if json_log:
            print(json.dumps({"time": round(time.time(), 3), "stage": name, "event": event}), flush=True)
        elif not quiet:
            console.print({"skip": f"[dim]= {name}: up to date, skipped[/]", "start": f"[bold]> {name}[/]",
                           "done": f"[green]✓ {name}[/]"}[event])
            if event == "start" and progress is not None:
                progress.start(name)

    if quiet or json_log:
        manifest = build(options, out, force=force, on_stage=on_stage)
    else:
        with stage_progress("build") as progress:
            manifest = build(options, out, force=force, on_stage=on_stage, progress=progress)
    if json_log:
        print(json.dumps({"event": "finished", "out": str(out), "stages": list(manifest["stages"])}), flush=True)
    elif not quiet:
        print_build_summary(Path(out), manifest)


@app.command("inspect")
@user_errors
def inspect_command(build_dir: Path = typer.Argument(..., help="A build directory")) -> None:
    """Show a build's manifest: stages, options, versions, outputs."""
    from toolchain.core.errors import ArtifactError
    from toolchain.app.pipeline import MANIFEST, read_manifest

    if not (build_dir / MANIFEST).is_file():
        raise ArtifactError(f"{build_dir} has no {MANIFEST}; pass a directory made by `toolchain build`")
    manifest = read_manifest(build_dir)
    Console().print(f"[bold]{build_dir}[/] (toolchain {manifest.get('toolchain_version')})")
    Console().print("options: " + ", ".join(f"{k}={v}" for k, v in manifest.get("options", {}).items()), highlight=False)
    print_build_summary(build_dir, manifest)
    for name, record in manifest["stages"].items():
        for path, digest in record.get("outputs", {}).items():
            Console().print(f"  {record['output']}/{path}  {digest[:16]}", highlight=False)
