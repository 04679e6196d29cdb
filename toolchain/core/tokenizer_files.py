"""The files that travel with a model so its tokenizer (and generation defaults) load beside any export."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(source: Path | None, out: Path, overwrite: bool = True) -> list[str]:
    """Copy whichever TOKENIZER_FILES `source` has into `out` (nothing when `source` is None); with
    overwrite=False files already in `out` are kept. Returns the names copied."""
    copied = []
    if source is None:
        return copied
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (overwrite or not (out / name).exists()):
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied
