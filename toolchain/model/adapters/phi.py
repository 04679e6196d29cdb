"""Phi-2 (PhiForCausalLM): parallel attention+MLP on one LayerNorm, partial rotary, biases, GELU."""

from toolchain.core.errors import UnsupportedArchitectureError
from toolchain.model.adapters.base import Adapter, register


def _phi(cfg) -> dict:
    if getattr(cfg, "qk_layernorm", False):
        raise UnsupportedArchitectureError("Phi with qk_layernorm=True is not supported")
    return {}


register(Adapter(
    architectures=("PhiForCausalLM",),
    embed="model.embed_tokens",
    layers="model.layers.{i}",
    final_norm="model.final_layernorm",
    mlp_norm=None,
    o="self_attn.dense",
    up="mlp.fc1", gate=None, down="mlp.fc2",
    layer_norm=True,
    config=_phi,
))
