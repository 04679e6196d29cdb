"""`toolchain recover`: recovery training of a compressed model (LoRA or distillation from the dense
model) into a plain canonical model dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from toolchain.app.commands.common import VERBOSE_OPTION, app, stage_progress, user_errors
from toolchain.app.commands.schema import schema_options
from toolchain.compress.options import RecoverOptions, check_device_name, with_default


@dataclass(kw_only=True)
class RecoverCommandOptions(RecoverOptions):
    """The recover command always recovers: distillation unless told otherwise."""

    recover: str = with_default(RecoverOptions, "recover", "distill")


@app.command("recover")
@user_errors
@schema_options(RecoverCommandOptions, into="values")
def recover_command(
    model_dir: Path = typer.Argument(..., help="A compressed model dir (`toolchain slice --out`, a build's sliced/)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist; a killed run resumes "
                                                      "from its checkpoint when given the same --out)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N"),
    verbose: bool = VERBOSE_OPTION,
    values: dict = None,  # the schema's options
) -> None:
    """Recover a compressed model by LoRA fine-tuning or distillation from its dense source."""
    from toolchain.app.model_card import write_model_card
    from toolchain.compress.recover import recover_to_dir

    check_device_name(device)
    options = RecoverCommandOptions(**values)
    with stage_progress("recover") as progress:
        result = recover_to_dir(model_dir, out, options, device=device, progress=progress)
    write_model_card(out)  # README.md, from the compression and recovery reports
    r = result.report
    Console().print(f"{r['method']}: held-out ppl {r['eval_ppl_before']:.2f} -> {r['best']['eval_ppl']:.2f} (best "
                    f"step {r['best']['step']} of {r['steps']}), {r['tokens_seen']:,} tokens, "
                    f"{r['timing']['wall_seconds']:.0f}s; wrote {out}", highlight=False)
