"""`toolchain eval`: perplexity and lm-eval zero-shot of a model or build."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import VERBOSE_OPTION, app, user_errors
from toolchain.core.build_dirs import model_dir


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Argument(..., help="Build dir (uses its sliced/ model), short name, checkpoint dir, .gguf "
                                          "file or hub id."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Perplexity text: ptb, wikitext2, c4, alpaca or a "
                                                           ".txt/.jsonl/.parquet file (default ptb unless --tasks)."),
    split: str = typer.Option("test", "--split", help="Split of a named dataset: train, validation, test."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length in tokens (non-overlapping windows)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Score only the first N windows."),
    batch_size: int = typer.Option(1, "--batch-size"),
    bos: bool = typer.Option(False, "--bos", help="Put the tokenizer's BOS first in every window."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval zero-shot tasks, comma-separated "
                                                               "(needs lm-eval and cached task data)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: examples per task (quick checks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write eval.json and eval.md into this directory."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Perplexity (documented protocol) and optional lm-eval zero-shot accuracy of a model or build."""
    import platform

    import torch
    import transformers
    from rich.table import Table

    from toolchain.data.text import load_text
    from toolchain.core.errors import InvalidOptionError
    from runtime.evaluate import perplexity, write_report, zero_shot
    from toolchain.data.sources import load_hf_model, resolve_model

    for name, value in (("seqlen", seqlen), ("max-windows", max_windows), ("batch-size", batch_size),
                        ("limit", limit)):
        if value is not None and value < 1:
            raise InvalidOptionError(f"--{name} must be a positive integer, got {value}")
    if ppl is None and not tasks:
        ppl = "ptb"
    text = load_text(ppl, split) if ppl else None  # bad dataset names fail before the model loads
    build_model = model_dir(Path(model).expanduser())
    spec = str(build_model) if (build_model / "config.json").is_file() else model
    resolved = resolve_model(spec)
    hf_model, tokenizer = load_hf_model(resolved)
    max_len = getattr(hf_model.config, "max_position_embeddings", None)
    if ppl and max_len and seqlen > max_len:
        raise InvalidOptionError(f"--seqlen {seqlen} exceeds the model's maximum of {max_len}; lower it")

    report: dict = {"model": model, "resolved": str(resolved.path), "kind": resolved.kind,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "python": platform.python_version()}}
    out_console = Console()
    table = Table("metric", "value", title=f"eval: {model}")
    if text is not None:
        result = perplexity(hf_model, tokenizer, text, seqlen=seqlen, max_windows=max_windows,
                            batch_size=batch_size, bos=bos)
        report["perplexity"] = {"dataset": ppl, "split": split, **result}
        table.add_row(f"ppl {ppl}/{split}", f"{result['ppl']:.3f}")
        table.add_row("tokens scored", f"{result['tokens']} in {result['windows']} x {result['seqlen']}")
        table.add_row("seconds", f"{result['seconds']:.1f}")
    if tasks:
        scores = zero_shot(hf_model, tokenizer, tasks.split(","), batch_size=batch_size, limit=limit)
        report["zero_shot"] = scores
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                table.add_row(f"{task} {metric}", f"{value:.4f}")
    out_console.print(table)
    if out is not None:
        paths = write_report(out, report)
        out_console.print(f"report: {paths['json']} and {paths['markdown']}", highlight=False)
