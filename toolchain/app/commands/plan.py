"""`toolchain plan`: memory fit and latency bounds on named GPUs, from a config only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import app, user_errors


@app.command()
@user_errors
def plan(
    model: str = typer.Option(..., "--model", help="Short name (llama-2-70b, phi-2, opt-125m, ...), hub id, "
                                                   "checkpoint dir or config.json. Only the config is read."),
    slice: float = typer.Option(0.3, "--slice", help="SliceGPT fraction of the hidden width removed, in [0, 1)."),
    gpu: str = typer.Option("all", "--gpu", help="GPU name(s), comma-separated, or 'all'."),
    batch: int = typer.Option(1, "--batch"),
    context: int = typer.Option(4096, "--context", help="Prompt length for prefill and cache length for decode."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp32 | fp16 | bf16 | int8 | int4 (weight-only)."),
    slice_head: bool = typer.Option(False, "--slice-head", help="Slice the LM head input too."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Bench JSON to fit efficiency factors."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Will the dense and the sliced model fit on a GPU, and how fast can they be at best (from the config)."""
    import json

    from rich.table import Table

    from toolchain.analysis import roofline

    efficiency = roofline.fit_efficiency(calibrate) if calibrate is not None else None
    result = roofline.plan(roofline.resolve_config(model), slice=slice, gpus=gpu, batch=batch, context=context,
                           dtype=dtype, slice_head=slice_head, efficiency=efficiency)
    data = result.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    out = Console()
    if not out.is_terminal:  # pipes and tests: do not squeeze the table into 80 columns
        out = Console(width=140)
    out.print(roofline.summary_line(data), highlight=False)
    if efficiency is not None:
        out.print(f"calibrated on {efficiency.gpu}: compute x{efficiency.compute:.2f}, "
                  f"bandwidth x{efficiency.bandwidth:.2f} of peak", highlight=False)
    table = Table(*roofline.TABLE_HEADER, caption="(c) compute-bound, (m) bandwidth-bound; times are lower bounds "
                  "on #GPUs with ideal tensor parallelism")
    for cells in roofline.table_rows(data):
        table.add_row(*cells)
    out.print(table)
