"""Greedy generation over any Session, with a KV cache and left-padded batches."""

from __future__ import annotations

import numpy as np

from runtime.sessions import Session


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as HF generate makes them for left padding: cumsum − 1, padded slots 0."""
    return np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)


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
    step_ids, positions, past = input_ids, positions_from_mask(mask), session.empty_past(batch)
    tokens = []
    for _ in range(max_new_tokens):
        logits, past = session.run(step_ids, mask, positions, past)
        next_ids = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            next_ids = np.where(done, pad, next_ids)
            done |= next_ids == eos_token_id
        tokens.append(next_ids)
        if done.all():
            break
        step_ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), dtype=np.int64)
