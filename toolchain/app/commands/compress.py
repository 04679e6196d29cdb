"""`toolchain slice`: compress a model into an HF-style model dir."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from toolchain.app.commands.common import VERBOSE_OPTION, app, print_parameter_table, stage_progress, user_errors
from toolchain.app.commands.schema import schema_options
from toolchain.compress.options import CompressOptions


@app.command("slice")
@user_errors
@schema_options(CompressOptions, into="values")
def slice_command(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist)"),
    verbose: bool = VERBOSE_OPTION,
    values: dict = None,  # the schema's options
) -> None:
    """Compress a model and write a loadable HF-style model directory."""
    from toolchain.app.model_card import write_model_card
    from toolchain.compress.stage import compress_to_dir

    options = CompressOptions(**values)
    with stage_progress("compress") as progress:
        result = compress_to_dir(options, out, progress=progress)
    write_model_card(out)  # README.md, from compression_report.json
    print_parameter_table(f"{options.model} → {out}", result.report["parameters"])
    size = result.report["weight_bytes"]
    Console().print(f"weights ({size['dtype']}): {size['dense'] / 1e6:,.1f} MB in, {size['compressed'] / 1e6:,.1f} MB out")
    Console().print(f"wrote {out} in {result.seconds:.1f}s")
