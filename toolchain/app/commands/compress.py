"""`toolchain slice`: compress a model into an HF-style model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import (DEVICE_OPTION, OFFLOAD_OPTION, STREAM_OPTION, app, parse_widths, print_parameter_table,
                                           stage_progress, user_errors)


@app.command("slice")
@user_errors
def slice_command(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, short name (smollm2-135m, phi-2, ...), HF dir or .gguf"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist)"),
    slice_: float = typer.Option(0.3, "--slice", help="Fraction of the hidden width removed, in [0, 1)"),
    method: str = typer.Option("slicegpt", help="slicegpt | modegpt | slicegpt+modegpt"),
    compression: float = typer.Option(0.25, help="MoDeGPT: fraction of block parameters removed"),
    calib: str = typer.Option("ptb", help="Calibration text: ptb | wikitext2 | c4 | alpaca | a .txt/.jsonl/.parquet file"),
    nsamples: int = typer.Option(32, help="Calibration windows"),
    seqlen: int = typer.Option(256, help="Tokens per calibration window"),
    widths: Optional[str] = typer.Option(None, help="Explicit residual widths, comma-separated (one per position)"),
    rotation: str = typer.Option("pca", help="pca | random | identity (the last two are sanity baselines)"),
    slice_head: bool = typer.Option(False, "--slice-head", help="Also slice the final norm / LM head input"),
    tie: str = typer.Option("slice", help="Tied embeddings: slice (one sliced table) | project (full table + "
                            "projections) | untie (reference SliceGPT: separate head)"),
    tie_basis: str = typer.Option("joint", "--tie-basis", help="--tie slice: the shared table's rotation from the "
                                  "first residual stream and the head input (joint) | the first stream only (first)"),
    share: str = typer.Option("none", help="One rotation per group of positions, no shortcut inside a group: "
                              "none | layer (attention+MLP of a layer) | all"),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="Total parameters to keep (embeddings, "
                                                "head and shortcuts included); picks the widths, overrides --slice"),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Fraction of the input's total "
                                                 "(tied) parameters to keep, e.g. 0.8; overrides --slice"),
    budget: str = typer.Option("variance", help="How a target is met: uniform (one width) | variance (one "
                               "explained-variance fraction for all positions) | global (greedy on the PCA spectra)"),
    allow_larger: bool = typer.Option(False, "--allow-larger", help="Write the result even if it is not smaller "
                                      "than the input"),
    seed: int = typer.Option(0, help="Calibration sampling seed"),
    device: str = DEVICE_OPTION,
    stream: bool = STREAM_OPTION,
    offload_activations: Optional[Path] = OFFLOAD_OPTION,
) -> None:
    """Compress a model and write a loadable HF-style model directory."""
    from toolchain.compress.stage import CompressOptions, compress_to_dir

    options = CompressOptions(model=model, method=method, slice=slice_, compression=compression,
                              widths=parse_widths(widths), rotation=rotation, slice_head=slice_head, tie=tie, calib=calib,
                              nsamples=nsamples, seqlen=seqlen, seed=seed, device=device, tie_basis=tie_basis,
                              share=share, target_params=target_params, target_ratio=target_ratio, budget=budget,
                              allow_larger=allow_larger, stream=stream,
                              offload_activations=str(offload_activations) if offload_activations else None)
    with stage_progress("compress") as progress:
        result = compress_to_dir(options, out, progress=progress)
    print_parameter_table(f"{model} → {out}", result.report["parameters"])
    size = result.report["weight_bytes"]
    Console().print(f"weights ({size['dtype']}): {size['dense'] / 1e6:,.1f} MB in, {size['compressed'] / 1e6:,.1f} MB out")
    Console().print(f"wrote {out} in {result.seconds:.1f}s")
