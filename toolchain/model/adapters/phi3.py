"""Phi-3: Llama-like with fused qkv_proj and gate_up_proj (gate rows first)."""

from toolchain.model.adapters.base import Adapter, register

register(Adapter(
    architectures=("Phi3ForCausalLM",),
    embed="model.embed_tokens",
    layers="model.layers.{i}",
    final_norm="model.norm",
    qkv="self_attn.qkv_proj",
    gate_up="mlp.gate_up_proj",
))
