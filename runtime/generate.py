"""The one decode loop: a prefill then one-token steps over any Session, each call fed the cache the
previous one returned. Greedy generation, parity's steps and the latency harness all step through
`KVStream`, so masks, positions and the cache are carried the same way everywhere."""

from __future__ import annotations

import numpy as np

from runtime.sessions import Past, Session


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as HF generate makes them for left padding: cumsum − 1, padded slots 0."""
    return np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)


class KVStream:
    """A batch of sequences stepping through a Session.

    `mask` covers the cache plus the tokens of the current call and `positions` are those tokens'
    position ids; `run` makes the call, `extend` prepares the next one-token call (one more mask
    column, positions + 1). They are separate so a timer can wrap the model call alone.
    """

    def __init__(self, session: Session, past: Past, mask: np.ndarray, positions: np.ndarray):
        self.session, self.past, self.mask, self.positions = session, past, mask, positions

    @classmethod
    def prompt(cls, session: Session, attention_mask: np.ndarray) -> KVStream:
        """Ready for the prefill call of a (left-padded) prompt batch."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        return cls(session, session.empty_past(mask.shape[0]), mask, positions_from_mask(mask))

    @classmethod
    def cached(cls, session: Session, past: Past) -> KVStream:
        """After a cache of unpadded tokens (every row full): the next call is `decode`."""
        batch, length = past[0][0].shape[0], past[0][0].shape[2]
        return cls(session, past, np.ones((batch, length), dtype=np.int64),
                   np.full((batch, 1), length - 1, dtype=np.int64))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        """One call with the current mask and positions; keeps the returned cache. Logits out."""
        logits, self.past = self.session.run(input_ids, self.mask, self.positions, self.past)
        return logits

    def extend(self) -> None:
        """Mask and positions of the next call: one new token per row after the current ones."""
        self.mask = np.concatenate([self.mask, np.ones((self.batch, 1), dtype=np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1

    def decode(self, next_ids: np.ndarray) -> np.ndarray:
        """One decode step: `next_ids` (batch, 1) after everything run so far."""
        self.extend()
        return self.run(next_ids)


def greedy_generate(session: Session, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                    max_new_tokens: int = 32, eos_token_id: int | None = None,
                    pad_token_id: int | None = None) -> np.ndarray:
    """New tokens (batch, ≤ max_new_tokens). Rows that emitted EOS are padded with `pad_token_id`
    (default: EOS) until every row is done or the budget is spent."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch = input_ids.shape[0]
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    done = np.zeros(batch, dtype=bool)
    stream = KVStream.prompt(session, mask)
    tokens = []
    for step in range(max_new_tokens):
        logits = stream.run(input_ids) if step == 0 else stream.decode(tokens[-1][:, None])
        next_ids = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            next_ids = np.where(done, pad, next_ids)
            done |= next_ids == eos_token_id
        tokens.append(next_ids)
        if done.all():
            break
    return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), dtype=np.int64)
