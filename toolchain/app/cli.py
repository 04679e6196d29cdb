"""The `toolchain` command. Each command is a thin call into a stage function; user mistakes
(ToolchainError) become one line on stderr and exit code 2, never a traceback. Importing this module
registers every command and loads no torch: each command imports its heavy modules when it runs."""

from __future__ import annotations

import sys

# registration order is the order `toolchain --help` lists the commands in
from toolchain.app.commands import compress, recover, plan, evaluate, export, build, bench, deploy, doctor  # noqa: F401,I001,E501
from toolchain.app.commands.common import app


def _add_tensorrt_commands() -> None:
    from exporters.tensorrt.cli import cli as trt_cli

    app.add_typer(trt_cli, name="trt", help="TensorRT bundle: build the engine, check, validate")


_add_tensorrt_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
