"""Where a build keeps its torch model.

`sliced/` holds the compressed model; a build with recovery also has `recovered/`, the same model
after recovery training, and every later stage (export, TensorRT bundle, parity, bench, eval) reads
that one. The pipeline removes a stale `recovered/` when a rerun turns recovery off, so "is there a
recovered/ model" answers "which model is the build's" without the build's options at hand.
"""

from __future__ import annotations

from pathlib import Path

COMPRESSED = "sliced"
RECOVERED = "recovered"


def model_dir(build: str | Path) -> Path:
    """The build's final torch model dir: recovered/ when recovery ran, else sliced/."""
    build = Path(build)
    recovered = build / RECOVERED
    return recovered if (recovered / "config.json").is_file() else build / COMPRESSED


MODEL_DIRS = (COMPRESSED, RECOVERED)  # what a stage reading the build's model depends on
