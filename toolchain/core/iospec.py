"""The I/O contract of every exported decoder graph: tensor names, dim names and shapes.

One graph serves prefill and decode: input_ids, attention_mask, position_ids and the past keys/values
of every layer in; logits and the presents out. Names and dim names follow optimum and
onnxruntime-genai, so their runtimes load the graph as it is. Exporters build graphs from this
module and sessions feed them through it, so a name is spelled in one place only.

Per-layer KV head dims may differ (MoDeGPT shrinks them layer by layer, and key ≠ value), so every
shape here is per layer. Pure names and ints: no torch, no onnx.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from toolchain.core.errors import ArtifactError

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
DIM_DESCRIPTIONS = {BATCH: "batch", SEQ: "new tokens this step (prefill: prompt length, decode: 1)",
                    PAST: "cached tokens (0 at prefill)", TOTAL: f"{PAST} + {SEQ} (attention_mask length)"}

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
KV_KINDS = ("key", "value")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def past_name(layer: int | str, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int | str, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


# onnxruntime-genai's genai_config.json names the KV tensors with a %d template per kind.
GENAI_INPUT_NAMES = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                     "past_key_names": past_name("%d", "key"), "past_value_names": past_name("%d", "value")}
GENAI_OUTPUT_NAMES = {"logits": LOGITS, "present_key_names": present_name("%d", "key"),
                      "present_value_names": present_name("%d", "value")}


def input_names(num_layers: int) -> list[str]:
    return [*TOKEN_INPUTS, *(past_name(i, kind) for i in range(num_layers) for kind in KV_KINDS)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *(present_name(i, kind) for i in range(num_layers) for kind in KV_KINDS)]


def is_kv_name(name: str, prefix: str) -> bool:
    """`name` is a per-layer key/value tensor under `prefix` (PAST_PREFIX or PRESENT_PREFIX)."""
    return name.startswith(prefix) and name.endswith(tuple(f".{kind}" for kind in KV_KINDS))


def kv_head_dims(config) -> list[tuple[int, int]]:
    """(key head dim, value head dim) per layer of a canonical config (anything with qk_head_dims and
    v_head_dims); they may differ per layer and from each other."""
    return list(zip(config.qk_head_dims, config.v_head_dims))


def io_shapes(kv_heads: int, key_dims: Sequence[int], value_dims: Sequence[int],
              vocab_size: int) -> tuple[dict[str, list], dict[str, list]]:
    """({input: shape}, {output: shape}) in graph order; str entries are the dynamic dims. The mask
    spans past + new tokens; the presents are the past with this step's tokens appended."""
    inputs = {INPUT_IDS: [BATCH, SEQ], ATTENTION_MASK: [BATCH, TOTAL], POSITION_IDS: [BATCH, SEQ]}
    outputs = {LOGITS: [BATCH, SEQ, vocab_size]}
    for layer, dims in enumerate(zip(key_dims, value_dims)):
        for kind, dim in zip(KV_KINDS, dims):
            inputs[past_name(layer, kind)] = [BATCH, kv_heads, PAST, dim]
            outputs[present_name(layer, kind)] = [BATCH, kv_heads, TOTAL, dim]
    return inputs, outputs


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    """{tensor: {axis: dim name}} for every dynamic axis (TorchScript exporter's form)."""
    inputs, outputs = io_shapes(0, [0] * num_layers, [0] * num_layers, 0)
    return {name: {axis: dim for axis, dim in enumerate(shape) if isinstance(dim, str)}
            for name, shape in {**inputs, **outputs}.items()}


def step_shapes(batch: int, new: int, past: int, kv: dict) -> dict[str, tuple]:
    """Input shapes of one model call with `new` tokens on `past` cached ones. `kv`: {"heads",
    "key_head_dims", "value_head_dims"} (export_config.json's / trt_build.json's kv_cache)."""
    shapes = {INPUT_IDS: (batch, new), ATTENTION_MASK: (batch, past + new), POSITION_IDS: (batch, new)}
    for i, dims in enumerate(zip(kv["key_head_dims"], kv["value_head_dims"])):
        for kind, dim in zip(KV_KINDS, dims):
            shapes[past_name(i, kind)] = (batch, kv["heads"], past, dim)
    return shapes


def past_kv_shapes(shapes: Mapping[str, Sequence]) -> list[tuple[Sequence, Sequence]]:
    """(key shape, value shape) per layer of the past inputs in `shapes` ({input name: shape}, as a
    graph, an ORT session or an engine reports them); layers are counted from 0 while a key exists."""
    layers, layer = [], 0
    while past_name(layer, "key") in shapes:
        value = past_name(layer, "value")
        if value not in shapes:
            raise ArtifactError(f"the graph has {past_name(layer, 'key')} but no {value}")
        layers.append((shapes[past_name(layer, "key")], shapes[value]))
        layer += 1
    return layers


def past_feeds(past: Sequence[tuple]) -> dict:
    """{past input name: tensor} of a [(key, value) per layer] cache."""
    return {past_name(i, kind): tensor for i, pair in enumerate(past) for kind, tensor in zip(KV_KINDS, pair)}


def presents(outputs: Mapping, num_layers: int) -> list[tuple]:
    """[(key, value) per layer] from {output name: tensor}."""
    return [(outputs[present_name(i, "key")], outputs[present_name(i, "value")]) for i in range(num_layers)]
