"""The export-time view of the canonical model: flat tensors in, flat tensors out.

ONNX graphs cannot carry transformers' Cache objects, so the wrapper takes the past keys/values
as positional tensors, runs the model over a `ListCache`, and returns logits plus the presents.
Names and dynamic dims are toolchain.core.iospec's (optimum / onnxruntime-genai).
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.core.iospec import BATCH, PAST, SEQ, TOTAL, kv_head_dims
from toolchain.model.modeling import ListCache, SlicedForCausalLM


class KVCacheWrapper(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: SlicedForCausalLM):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = ListCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *(t for kv in cache.present for t in kv))


def example_inputs(config, batch: int = 2, seq: int = 4, past: int = 3, dtype=torch.float32) -> tuple:
    """Inputs for tracing. Sizes are ≥ 2 and pairwise different so torch.export keeps every dim
    symbolic (a size of 0 or 1, or two equal sizes, would be specialised or unified)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for key_dim, value_dim in kv_head_dims(config):
        kv.append(torch.randn(batch, config.num_key_value_heads, past, key_dim, generator=gen, dtype=dtype))
        kv.append(torch.randn(batch, config.num_key_value_heads, past, value_dim, generator=gen, dtype=dtype))
    return (ids, mask, positions, *kv)


def dynamic_shapes(num_layers: int) -> tuple:
    """torch.export dims per forward parameter (the *past varargs take one tuple). The mask length
    is its own dim: its equality with past + sequence is a runtime contract ONNX cannot express."""
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQ)
    past, total = torch.export.Dim(PAST), torch.export.Dim(TOTAL)
    kv = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv)
