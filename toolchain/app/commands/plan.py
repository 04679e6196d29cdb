"""`toolchain plan`: memory fit and latency bounds on named GPUs, from a config only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import app, user_errors
from toolchain.app.commands.schema import schema_options
from toolchain.compress.options import CompressOptions, Interval, check_option, option, option_fields


def _as_slice_declares(name: str):
    """`toolchain slice`'s option `name`: its flags, help, checks and default."""
    declared = CompressOptions.__dataclass_fields__[name]
    return field(default=declared.default, metadata=declared.metadata)


@dataclass(kw_only=True)
class PlanSizeOptions:
    """The options of `toolchain slice` that change the compressed model's size, so a plan describes the
    model `slice` writes with the same flags (and the same defaults)."""

    method: str = _as_slice_declares("method")
    # unlike `slice`, 0 is a plan of the model as it is (the way to plan a checkpoint already sliced)
    slice: float = option(CompressOptions.__dataclass_fields__["slice"].default, "Fraction of the hidden width "
                          "removed, in {range} (0: the model as it is, e.g. a checkpoint already sliced)",
                          interval=Interval(0.0, 1.0, high_open=True))
    compression: float = _as_slice_declares("compression")
    modegpt_multiple: int = _as_slice_declares("modegpt_multiple")
    slice_head: bool = _as_slice_declares("slice_head")
    tie: str = _as_slice_declares("tie")
    share: str = _as_slice_declares("share")


@app.command()
@user_errors
@schema_options(PlanSizeOptions, into="size")
def plan(
    model: str = typer.Option(..., "--model", help="Short name (llama-2-70b, phi-2, opt-125m, ...), hub id, "
                                                   "checkpoint dir or config.json. Only the config is read."),
    gpu: str = typer.Option("all", "--gpu", help="GPU name(s), comma-separated, or 'all'."),
    batch: int = typer.Option(1, "--batch"),
    context: int = typer.Option(4096, "--context", help="Prompt length for prefill and cache length for decode."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp32 | fp16 | bf16 | int8 | int4 (weight-only)."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Bench JSON to fit efficiency factors."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
    size: dict = None,
) -> None:
    """Will the dense and the compressed model fit on a GPU, and how fast can they be at best (from the config).

    The compressed model is the one `toolchain slice` writes with the same --method, --slice, --slice-head,
    --tie and --share: its parameter count is exact. MoDeGPT picks each layer's share of --compression from
    calibration data, so the plan gives every layer the same fraction: its block total matches to within
    per-layer rounding, but not layer by layer.
    """
    import json

    from rich.table import Table

    from toolchain.analysis import roofline

    options = PlanSizeOptions(**size)
    for f in option_fields(PlanSizeOptions):  # the model's width is checked by roofline.plan
        check_option(options, f.name)
    efficiency = roofline.fit_efficiency(calibrate) if calibrate is not None else None
    result = roofline.plan(roofline.resolve_config(model), gpus=gpu, batch=batch, context=context, dtype=dtype,
                           efficiency=efficiency, **size)
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
