"""RoPE of MoDeGPT's reduced q/k heads in the fast ORT graph, exactly, with ORT's RotaryEmbedding.

MoDeGPT keeps a different set of RoPE pairs per KV head (the q heads of its group share the set):
pair p of KV head g rotates by the frequency rope_pair_index[layer][g][p], not by frequency p.
RotaryEmbedding applies one cos/sin row (picked by position_ids) to every head of a token, so it
cannot take per-head frequencies directly. But the row is picked per position id, and the ids are an
input: view q (batch, seq, heads·dim) as (batch, seq·kv, group·dim) — a reshape, the q heads of a
group are adjacent — and k as (batch, seq·kv, dim), so every (token, KV group) pair is one "position",
and give each its own row: the cos/sin rows of the step's positions, gathered at the group's kept
frequencies, (batch·seq·kv, pairs). The ids are then just 0..batch·seq·kv−1. Per layer this costs a
Gather, a Split and four Reshapes over the step's tokens; the rotation stays one fused kernel.
"""

from __future__ import annotations

import numpy as np


def step_rows(b, caches: list[str], positions: str, kv_heads: int) -> tuple[str, str]:
    """Once per graph: (cos|sin rows of the step's positions (batch, seq, rot) with every frequency,
    the ids 0..batch·seq·kv−1 as (batch, seq·kv))."""
    rows = [b.op("Gather", [cache, positions], name=f"kept_pairs/{kind}_rows", axis=0)[0]
            for cache, kind in zip(caches, ("cos", "sin"))]
    both = b.op("Concat", rows, name="kept_pairs/cos_sin_rows", axis=-1)[0]
    count = b.op("Mul", [b.op("Size", [positions], name="kept_pairs/tokens")[0],
                         b.const("kept_pairs/kv_heads", np.array(kv_heads, np.int64))], name="kept_pairs/rows")[0]
    ids = b.op("Range", [b.const("kept_pairs/zero", np.array(0, np.int64)), count,
                         b.const("kept_pairs/one", np.array(1, np.int64))], name="kept_pairs/range")[0]
    batch = b.op("Shape", [positions], name="kept_pairs/batch", start=0, end=1)[0]
    shape = b.op("Concat", [batch, b.const("kept_pairs/minus_one", np.array([-1], np.int64))],
                 name="kept_pairs/ids_shape", axis=0)[0]
    return both, b.op("Reshape", [ids, shape], name="kept_pairs/ids")[0]


def rotate(b, q: str, k: str, rows: tuple[str, str], pairs, half: int, heads: int, kv_heads: int, dim: int,
           prefix: str) -> tuple[str, str]:
    """q, k of one layer rotated by their KV group's kept frequencies. `pairs` (kv, n): the frequency
    index of each kept pair; `half`: the frequencies in the rows (rot/2 of the dense model)."""
    table, ids = rows
    pairs = np.asarray(pairs, np.int64)
    n, group = pairs.shape[1], heads // kv_heads
    index = b.const(f"{prefix}.rope_pairs", np.concatenate((pairs, pairs + half), axis=1))  # cos | sin columns
    picked = b.op("Gather", [table, index], name=f"{prefix}/rope_rows", axis=2)[0]  # (batch, seq, kv, 2n)
    flat = b.op("Reshape", [picked, b.const(f"{prefix}.rope_rows_shape", np.array([-1, 2 * n], np.int64))],
                name=f"{prefix}/rope_rows_flat")[0]
    cos, sin = b.op("Split", [flat, b.const(f"{prefix}.rope_split", np.array([n, n], np.int64))], 2,
                    name=f"{prefix}/rope_split", axis=1)
    out = []
    for t, kind, per_row, width in ((q, "q", group, heads * dim), (k, "k", 1, kv_heads * dim)):
        grouped = b.op("Reshape", [t, b.const(f"{prefix}.{kind}_by_group", np.array([0, -1, per_row * dim], np.int64))],
                       name=f"{prefix}/{kind}_by_group")[0]
        rotated = b.op("RotaryEmbedding", [grouped, ids, cos, sin], name=f"{prefix}/rotary_{kind}",
                       domain="com.microsoft", num_heads=per_row, rotary_embedding_dim=2 * n, interleaved=0)[0]
        out.append(b.op("Reshape", [rotated, b.const(f"{prefix}.{kind}_by_token", np.array([0, -1, width], np.int64))],
                        name=f"{prefix}/{kind}_by_token")[0])
    return out[0], out[1]
