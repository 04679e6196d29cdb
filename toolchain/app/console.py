"""What the console shows: our own lines only, unless `--verbose`.

The libraries a build drives each print on their own: transformers' "Loading weights" and "Writing
model shards" bars, its GGUF loader's tqdm bar, datasets' and huggingface_hub's bars, deprecation and
export warnings, and log records. Their progress means nothing to a user who asked for a build, and it
buries our stage lines and errors. `hide_library_output()` runs at CLI start, before any of those
libraries is imported (so it sets their environment switches, imports none of them), and
`show_library_output()` undoes it for `--verbose`.

Our lines: `> stage`, `✓ stage`, `= stage: up to date, skipped`, `error: ...` and `warning: ...` on
stderr, tables and summaries on stdout. Our own log records (loggers under the packages below) are
kept, printed as `warning: <message>`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

# read when each library is imported: transformers' and hub's bars, datasets' bars, any tqdm bar
# (transformers' GGUF loader uses tqdm directly), transformers' log level and advisory warnings
LIBRARY_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
OUR_PACKAGES = ("toolchain", "runtime", "exporters", "benchmarks")

_undo: list[Callable[[], None]] = []


class _OurLines(logging.StreamHandler):
    """`warning: <message>` on whatever sys.stderr is when the record comes, so that a live progress bar
    (which redirects stderr) prints the line above itself instead of through it."""

    def __init__(self, level: int):
        super().__init__()
        self.setLevel(level)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler's constructor sets it; the property is what counts
        pass

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def hide_library_output() -> None:
    """Hide third-party bars, warnings and logs (idempotent). Imports no library."""
    if _undo:
        return
    for name, value in LIBRARY_ENV.items():
        if name not in os.environ:  # a user's own setting wins
            os.environ[name] = value
            _undo.append(lambda name=name: os.environ.pop(name, None))
    saved = warnings.catch_warnings()  # restores the filters on exit
    saved.__enter__()
    warnings.simplefilter("ignore")  # python warnings are for developers: --verbose shows them
    _undo.append(lambda: saved.__exit__(None, None, None))
    _quiet_logging()
    _quiet_imported_libraries()


def show_library_output() -> None:
    """Undo `hide_library_output` (for `--verbose`)."""
    while _undo:
        _undo.pop()()


def _quiet_logging() -> None:
    # a root handler that passes errors only: libraries' warnings and infos stop there, and its
    # presence turns the basicConfig(level=INFO) some libraries call at import into a no-op
    root, errors_only = logging.getLogger(), _OurLines(logging.ERROR)
    root.addHandler(errors_only)
    _undo.append(lambda: root.removeHandler(errors_only))
    handler = _OurLines(logging.WARNING)
    for name in OUR_PACKAGES:
        logger = logging.getLogger(name)
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False

        def restore(logger=logger, level=level, propagate=propagate):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate

        _undo.append(restore)


def _quiet_imported_libraries() -> None:
    """Environment switches act at import: a library already imported (in tests, a notebook) is
    switched off through its own API instead."""
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()

        def restore():
            transformers_logging.set_verbosity(level)
            if bars:
                transformers_logging.enable_progress_bar()

        _undo.append(restore)
    hub_utils = sys.modules.get("huggingface_hub.utils")
    if hub_utils is not None and not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        _undo.append(hub_utils.enable_progress_bars)
    datasets = sys.modules.get("datasets")
    if datasets is not None and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        _undo.append(datasets.enable_progress_bars)
