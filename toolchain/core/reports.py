"""The one way a stage publishes a report: `<stem>.json` (the data, keys in the caller's order) and
`<stem>.md` (rendered from that same data), each written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from toolchain.core.fileio import write_json, write_text


def write_report(out_dir: str | os.PathLike, data: dict, render_markdown: Callable[[dict], str],
                 stem: str) -> dict[str, Path]:
    """Write `<stem>.json` then `<stem>.md` into out_dir (created if missing); their paths by kind.

    The Markdown is rendered before anything is written, so a rendering error leaves no half report."""
    out_dir = Path(out_dir)
    markdown = render_markdown(data)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    write_json(paths["json"], data)
    write_text(paths["markdown"], markdown)
    return paths
