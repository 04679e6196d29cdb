"""The `toolchain` command. Each command is a thin call into a stage function; user mistakes
(ToolchainError) become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ToolchainError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LLMs and ship them to ONNX Runtime / TensorRT with parity and latency reports.")
console = Console(stderr=True)


def user_errors(fn):
    """Turn ToolchainError into `error: <message>` and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolchainError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code)

    return wrapper


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
