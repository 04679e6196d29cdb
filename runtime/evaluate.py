"""Perplexity under a stated protocol, an lm-eval zero-shot bridge, and the eval report files.

Scores any causal LM whose forward(input_ids, attention_mask=, position_ids=) returns `.logits`, or any
Session (torch, onnxruntime, TensorRT) through one prefill call per batch.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from toolchain.data.text import Windows, eval_windows, offline_unless_reachable
from toolchain.core.errors import BackendUnavailableError, DataError, InvalidOptionError
from toolchain.core import reports

from runtime.sessions import Session


def _forward(model) -> tuple[Callable, torch.device]:
    """(ids, mask, positions) → logits of every position, and the device the inputs go to: a torch
    causal LM's forward, or one prefill call (empty cache) of a Session, so torch and ORT are scored
    by the same code."""
    if isinstance(model, Session):
        def run(ids, mask, positions):
            past = model.empty_past(ids.shape[0])
            logits, _ = model.run(ids.numpy(), mask.numpy(), positions.numpy(), past)
            return torch.from_numpy(logits)

        return run, torch.device("cpu")
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        device = torch.device("cpu")
    return lambda ids, mask, positions: model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, device


@torch.inference_mode()
def perplexity(model, tokenizer, data: str | Windows, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, bos: bool = False,
               on_scored: Callable[[torch.Tensor], None] | None = None) -> dict:
    """exp(mean NLL) over every scored token; `data` is raw text (cut per data.eval_windows) or Windows.
    `model` is a torch causal LM or any Session (torch, ORT, TensorRT).

    A token is scored when it and the token before it are both real (attention_mask 1), so right and
    left padding never count. position_ids follow the mask, so left-padded rows see positions 0, 1, ...
    `on_scored` gets each batch's logits rows that were scored (float32, in order), e.g. to compare
    two models' predictions on the same tokens.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be a positive integer, got {batch_size!r}")
    windows = data if isinstance(data, Windows) else eval_windows(tokenizer, data, seqlen, max_windows, bos)
    if isinstance(data, Windows) and max_windows is not None:
        windows = Windows(data.input_ids[:max_windows], data.attention_mask[:max_windows], data.protocol)
    forward, device = _forward(model)
    total_nll = 0.0  # float64 accumulation: many windows of summed float32 losses
    scored = 0
    start = time.perf_counter()
    for ids, mask in windows.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = forward(ids, mask, positions)
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        rows = logits[:, :-1][keep].float()
        nll = F.cross_entropy(rows, ids[:, 1:][keep], reduction="sum")
        total_nll += float(nll.double())
        scored += int(keep.sum())
        if on_scored is not None:
            on_scored(rows.cpu())
    seconds = time.perf_counter() - start
    if scored == 0:
        raise DataError("no token could be scored (every window is padding or one token long); give longer text")
    mean = total_nll / scored
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": scored,
        "windows": len(windows),
        "seqlen": int(windows.input_ids.shape[1]),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(scored / seconds, 1) if seconds > 0 else None,
        "protocol": {**windows.protocol, "metric": "exp(mean NLL over scored tokens)"},
    }


@functools.lru_cache(maxsize=1)
def _task_manager(factory):
    return factory()  # indexing every lm-eval task takes ~10 s; do it once per process


def zero_shot(model, tokenizer, tasks: list[str], batch_size: int = 1, limit: int | None = None,
              num_fewshot: int = 0) -> dict:
    """Accuracy-style metrics per task from lm-eval's harness, run on the in-memory model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise BackendUnavailableError(
            f"zero-shot tasks need lm-eval, which is not installed ({err}); pip install 'toolchain[eval]' "
            "(lm-eval>=0.4) or drop --tasks"
        ) from err
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise InvalidOptionError("--tasks is empty; give comma-separated lm-eval task names, e.g. hellaswag,piqa")
    manager = _task_manager(TaskManager)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidOptionError(f"unknown lm-eval task(s): {', '.join(unknown)}; see `lm-eval ls tasks` for names")
    with offline_unless_reachable():  # cached task data only, when the hub is unreachable
        try:
            loaded = manager.load(tasks)
        except Exception as err:  # noqa: BLE001  (task loading fails with datasets' many error types)
            raise DataError(
                f"cannot load the data for {', '.join(tasks)} ({type(err).__name__}: {err}); without network the "
                "task data must already be in the datasets cache: run once with internet to fill it, or drop --tasks"
            ) from err
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # Pass the loaded Task objects so the harness does not fetch their data a second time.
        output = lm_eval.simple_evaluate(model=harness_model, tasks=list(loaded["tasks"].values()),
                                         num_fewshot=num_fewshot, limit=limit, task_manager=manager)
    results = {}
    for task, metrics in (output or {}).get("results", {}).items():
        results[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
    return results


# --- report --------------------------------------------------------------------------------------


def report_markdown(report: dict) -> str:
    """A human summary made from the JSON report."""
    lines = [f"# Evaluation: {report.get('model', '?')}", ""]
    ppl = report.get("perplexity")
    if ppl:
        lines += [
            "## Perplexity", "",
            "| dataset | split | ppl | mean NLL | tokens | windows | seqlen | seconds |",
            "|---|---|---|---|---|---|---|---|",
            f"| {ppl.get('dataset')} | {ppl.get('split')} | {ppl['ppl']:.3f} | {ppl['nll']:.4f} | {ppl['tokens']} "
            f"| {ppl['windows']} | {ppl['seqlen']} | {ppl['seconds']} |",
            "", "Protocol:", "",
        ]
        lines += [f"- {k}: {v}" for k, v in ppl.get("protocol", {}).items()]
        lines.append("")
    tasks = report.get("zero_shot")
    if tasks:
        lines += ["## Zero-shot (lm-eval)", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in tasks.items():
            lines += [f"| {task} | {metric} | {value:.4f} |" for metric, value in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict, stem: str = "eval") -> dict[str, Path]:
    """`<stem>.json` and `<stem>.md` (report_markdown) into out_dir."""
    return reports.write_report(out_dir, report, report_markdown, stem)
