"""`toolchain doctor`: installed versions against the tested ranges."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from toolchain.app.commands.common import app, console, user_errors


@app.command("doctor")
@user_errors
def doctor_command(
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a dependency is missing or outside its "
                                                        "tested range (for CI)."),
) -> None:
    """Installed versions of every dependency next to the range the toolchain was tested with."""
    from rich.table import Table

    from toolchain import __version__
    from toolchain.core.versions import dependency_checks

    checks = dependency_checks()
    table = Table("package", "installed", "tested range", "needed for", "status",
                  title=f"toolchain {__version__} (python {sys.version.split()[0]})")
    style = {"ok": "green", "missing": "dim", "outside": "bold red"}
    for check in checks:
        status = "not installed" if check.status == "missing" else check.status
        if check.problem:
            status = f"[{style[check.status]}]{'MISSING' if check.status == 'missing' else 'OUTSIDE tested range'}[/]"
        table.add_row(check.name, check.installed or "-", check.tested or "any", check.extra or "core", status)
    Console(width=max(Console().width, 100)).print(table)
    problems = [check for check in checks if check.problem]
    for check in problems:
        console.print(f"[bold yellow]warning:[/] {check.name} {check.installed or '(not installed)'} is outside the "
                      f"tested range {check.tested}; install the locked versions with scripts/setup.sh "
                      f"(or pip install '{check.name}{check.tested}')", highlight=False, soft_wrap=True)
    if strict and problems:
        raise typer.Exit(1)
