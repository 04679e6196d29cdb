"""recover_report.json and recover_curve.png.

Only the `timing` section varies between runs (wall time, peak memory); every other field, and the
plot, which shows loss and held-out perplexity by step only, is the same for the same inputs."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from toolchain.core.fileio import write_json

REPORT = "recover_report.json"
PLOT = "recover_curve.png"


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def write(out_dir: Path, report: dict) -> None:
    write_json(out_dir / REPORT, report)
    plot(report["curve"], out_dir / PLOT, report["method"])


def plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    trained = [p for p in curve if "loss" in p]
    loss_axis.plot([p["step"] for p in trained], [p["loss"] for p in trained], color="tab:blue", label="train loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    ppl_axis = loss_axis.twinx()
    evals = [p for p in curve if "eval_ppl" in p]
    ppl_axis.plot([p["step"] for p in evals], [p["eval_ppl"] for p in evals], "o-", color="tab:red",
                  label="held-out ppl")
    ppl_axis.set_ylabel("held-out ppl", color="tab:red")
    loss_axis.set_title(f"recovery: {title}")
    fig.tight_layout()
    # no date or version in the file: the same curve gives the same bytes
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
