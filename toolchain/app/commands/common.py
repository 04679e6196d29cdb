"""The shared `toolchain` app: one-line user errors with exit code 2, progress bars, the parameter
table and the options several commands share (the compression options come from their schema: see
schema.py)."""

from __future__ import annotations

import contextlib
import functools
import sys

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from toolchain.app import console as library_console
from toolchain.core.errors import ToolchainError


class OneLineUsageErrors(typer.core.TyperGroup):
    """Mistyped options and values of the wrong type print like every other user mistake: one
    `error:` line and exit code 2 (click would print a usage block and a boxed message)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        library_console.hide_library_output()  # before any command imports a library; --verbose undoes it
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # typer's (vendored) click errors: usage and parameter errors
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
            else:
                where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                typer.echo(f"error: {err.format_message()}{where}", err=True)
            code = err.exit_code
        except typer.Abort:
            code = 1
        finally:
            library_console.show_library_output()  # a caller in the same process (tests) gets its settings back
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=OneLineUsageErrors,
                  help="Compress LLMs and ship them to ONNX Runtime / TensorRT with parity and latency reports.")
console = Console(stderr=True)


def user_errors(fn):
    """Turn ToolchainError into `error: <message>` and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolchainError as err:
            message = " ".join(str(err).split())  # one line, even when a library's message spans several
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code)

    return wrapper


def print_parameter_table(title: str, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("parameters")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    for key in ("embeddings", "blocks", "shortcuts", "lm_head", "total"):
        table.add_row(key, f"{summary['dense'][key]:,}", f"{summary['compressed'][key]:,}")
    Console().print(table)
    verdict = "smaller" if summary["smaller"] else "[bold red]LARGER than the input[/]"
    Console().print(f"kept {summary['kept_fraction']:.1%} of the parameters "
                    f"({summary['compression']:.1%} removed): {verdict}")


def _verbose(value: bool) -> None:
    if value:
        library_console.show_library_output()


# parsed before the command body runs, so before the command imports any library
VERBOSE_OPTION = typer.Option(False, "--verbose", callback=_verbose, expose_value=False, is_eager=True,
                              help="Also show the libraries' own progress bars, warnings and logs")

# weight-only quantization, shared by `build` and `deploy`
BLOCK_SIZE_OPTION = typer.Option(32, "--block-size", help="--quantize: weights per quantization block along K, "
                                 "a power of 2 ≥ 16")
QUANT_ALGORITHM_OPTION = typer.Option("minmax", "--quant-algorithm", help="int4 blocks: minmax (fast) | hqq "
                                      "(optimised scales, slower to quantize) | gptq (calibrated on --calib; needs "
                                      "the build's canonical model)")
QUANTIZE_EMBEDDINGS_OPTION = typer.Option(False, "--quantize-embeddings/--no-quantize-embeddings",
                                          help="int4: store the token table as 4-bit blocks (GatherBlockQuantized), "
                                               "one table with a tied 4-bit head")
RESIDUAL_BITS_OPTION = typer.Option(8, "--residual-bits", help="int4: bits of the head, head_proj and shortcuts "
                                    "(the MatMuls that read the residual stream): 4 | 8 | 32 (32: kept fp32)")
QUANT_COMPUTE_OPTION = typer.Option("int8", "--quant-compute", help="MatMulNBits activations on CPU: int8 (ORT's "
                                    "fast kernel, accuracy_level 4) | fp32 (closer to fp32 outputs, much slower)")


class StageProgress:
    """The progress callback stages take: `progress(done, total, note=None)` moves the bar (the note,
    e.g. "layer 3/30" or a training step's loss, is shown beside the label); `start(label)` gives the
    bar to the next stage."""

    def __init__(self, bar, label: str):
        self.bar, self.label = bar, label
        self.task = bar.add_task(label, total=None)

    def start(self, label: str) -> None:
        self.label = label
        self.bar.remove_task(self.task)  # a new task: no total (pulsing) until the stage reports one
        self.task = self.bar.add_task(label, total=None)

    def __call__(self, done: int, total: int, note: str | None = None) -> None:
        description = self.label if note is None else f"{self.label}: {note}"
        self.bar.update(self.task, completed=done, total=total, description=description)


@contextlib.contextmanager
def stage_progress(label: str):
    """A transient rich progress bar on stderr (nothing is drawn when stderr is not a terminal);
    yields a StageProgress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        yield StageProgress(bar, label)
