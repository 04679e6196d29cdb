"""The recovery text: training windows from the train split only, held-out windows for evaluation,
and a check that the two do not share text (an evaluation on training text would pick the
checkpoint that memorised best)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.core.errors import DataError
from toolchain.data.text import FILE_SUFFIXES, Windows, load_text, tokenize

HELD_OUT_SPLIT = "validation"  # the test split stays untouched for the reported perplexity
OVERLAP_SPAN = 32  # tokens: a shared span this long is copied text, not a common phrase
OVERLAP_LIMIT = 0.01  # fraction of held-out spans found in the training text that is refused


@dataclass
class TrainWindows:
    """Non-overlapping windows of the training stream, visited in a seeded random order per epoch, so
    the rows of any step follow from the step number alone (a resumed run needs no data state)."""

    rows: torch.Tensor  # LongTensor [n, seqlen]
    seed: int

    def micro_batch(self, step: int, micro: int, accum: int, batch: int) -> torch.Tensor:
        n = self.rows.shape[0]
        first = (step * accum + micro) * batch
        picks = []
        for index in range(first, first + batch):
            epoch, offset = divmod(index, n)
            picks.append(int(self._order(epoch)[offset]))
        return self.rows[picks]

    def _order(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            cache.clear()  # one epoch at a time is enough: steps only move forward
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            cache[epoch] = torch.randperm(self.rows.shape[0], generator=generator)
        return cache[epoch]


def is_file_source(name: str) -> bool:
    return str(name).lower().endswith(FILE_SUFFIXES)


def training_ids(tokenizer, source: str) -> torch.Tensor:
    return tokenize(tokenizer, load_text(source, "train"))


def train_windows(ids: torch.Tensor, seqlen: int, batch: int, seed: int) -> TrainWindows:
    count = ids.numel() // seqlen
    if count < batch:
        raise DataError(f"the recovery text has {ids.numel()} tokens, fewer than one batch of {batch} x {seqlen}; "
                        "lower --recover-batch or --recover-seqlen, or give more text")
    return TrainWindows(ids[: count * seqlen].view(count, seqlen).clone(), seed)


def held_out_ids(tokenizer, source: str, eval_source: str | None) -> tuple[torch.Tensor, dict]:
    """Token ids of the evaluation text and where they came from."""
    name = eval_source or source
    split = "file" if is_file_source(name) else HELD_OUT_SPLIT
    try:
        text = load_text(name, HELD_OUT_SPLIT)
    except DataError as err:
        raise DataError(f"no held-out text for the recovery evaluation ({err}); pass --recover-eval-data with a "
                        "dataset that has a validation split or a file") from None
    return tokenize(tokenizer, text), {"source": name, "split": split}


def held_out_windows(tokenizer, ids: torch.Tensor, seqlen: int, windows: int) -> Windows:
    # the protocol of toolchain.data.text.eval_windows, on ids already at hand
    count = min(ids.numel() // seqlen, windows)
    if count == 0:
        raise DataError(f"the held-out text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        "lower --recover-seqlen or give more held-out text")
    rows = ids[: count * seqlen].view(count, seqlen).clone()
    protocol = {"window": seqlen, "stride": seqlen, "windows": count,
                                         "scored": "every token after the first of each window"}
    return Windows(rows, torch.ones_like(rows), protocol)


def _span_hashes(ids: torch.Tensor, span: int) -> torch.Tensor:
    """A 64-bit polynomial hash of every `span`-token run (int64 arithmetic wraps, which is fine here)."""
    if ids.numel() < span:
        return torch.empty(0, dtype=torch.long)
    runs = ids.long().unfold(0, span, 1)
    powers = torch.ones(span, dtype=torch.long)
    for i in range(1, span):
        powers[i] = powers[i - 1] * 1_000_003
    hashes = torch.zeros(runs.shape[0], dtype=torch.long)
    for i in range(span):  # a loop of span vector ops: no int64 matmul kernel needed
        hashes += runs[:, i] * powers[i]
    return hashes


def overlap_fraction(train_ids: torch.Tensor, eval_ids: torch.Tensor, span: int = OVERLAP_SPAN) -> float:
    """The fraction of the held-out text's `span`-token runs that also occur in the training text."""
    held_out = _span_hashes(eval_ids, span)[::span]  # disjoint runs: enough to see copied text
    if held_out.numel() == 0:
        return 0.0
    return float(torch.isin(held_out, _span_hashes(train_ids, span)).float().mean())


def check_no_overlap(train_ids: torch.Tensor, eval_ids: torch.Tensor, where: dict) -> float:
    shared = overlap_fraction(train_ids, eval_ids)
    if shared > OVERLAP_LIMIT:
        raise DataError(f"the recovery evaluation text ({where['source']}, {where['split']}) overlaps the training "
                        f"text ({shared:.0%} of its {OVERLAP_SPAN}-token spans occur in it); pass held-out text "
                        "with --recover-eval-data")
    return shared
