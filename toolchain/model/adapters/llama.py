"""Llama 2/3, Mistral, Qwen2: pre-RMSNorm, gated SiLU MLP, RoPE (scaled variants via rope_parameters)."""

from toolchain.core.errors import UnsupportedArchitectureError
from toolchain.model.adapters.base import Adapter, register


def _llama_like(cfg) -> dict:
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "model_type", "") == "qwen2":
        raise UnsupportedArchitectureError("Qwen2 with use_sliding_window=True is not supported; use a model with it off")
    fields = {}
    if getattr(cfg, "model_type", "") == "qwen2":
        fields["sliding_window"] = None  # only active with use_sliding_window
    return fields


register(Adapter(
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    embed="model.embed_tokens",
    layers="model.layers.{i}",
    final_norm="model.norm",
    config=_llama_like,
))
