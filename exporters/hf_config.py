"""The config.json of an ONNX export dir: the source architecture's config, as optimum and
transformers 4.x read it, with the dimensions of the graph's KV cache.

optimum's `ORTModelForCausalLM` reads config.json for two things only: the model_type (which decides
how it feeds the graph) and the shapes of the empty past_key_values of the first step
(batch, num_key_value_heads, 0, hidden_size // num_attention_heads). Its generate() reads the token
ids. Our canonical config (model_type `sliced_decoder`) is unknown outside this project, so it is
kept beside the graph as CANONICAL_CONFIG, where our own tools read it.
"""

from __future__ import annotations

from pathlib import Path

CANONICAL_CONFIG = "sliced_config.json"
CONFIG = "config.json"


def source_model_type(architecture: str | None) -> str | None:
    """transformers' model_type of an HF causal-LM class name (LlamaForCausalLM -> llama)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class = {name: model_type for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    return by_class.get(architecture or "")


def optimum_incompatibility(config) -> str | None:
    """Why optimum cannot feed this graph, or None: it allocates one head dim for every KV tensor."""
    dims = {d for pair in zip(config.qk_head_dims, config.v_head_dims) for d in pair}
    if len(dims) != 1:
        return (f"its key/value head dims differ across layers or between keys and values ({sorted(dims)}); "
                "optimum allocates one head dim for every KV tensor")
    if source_model_type(config.source_architecture) is None:
        return f"the source architecture {config.source_architecture!r} has no transformers model_type"
    return None


def source_config(config, dtype: str) -> dict:
    """config.json for optimum / transformers 4.x from the canonical config of the exported model.

    hidden_size here is the attention width (heads x head dim), the number optimum divides by the
    head count to size the KV cache; the sliced residual widths live in CANONICAL_CONFIG only.
    """
    head_dim = max(*config.qk_head_dims, *config.v_head_dims)
    rope = dict(config.rope_parameters or {})
    fields = {
        "architectures": [config.source_architecture] if config.source_architecture else [],
        "model_type": source_model_type(config.source_architecture) or config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.num_attention_heads * head_dim,
        "intermediate_size": max(config.intermediate_sizes),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "use_cache": True,
        "torch_dtype": {"fp16": "float16"}.get(dtype, "float32"),  # the 4.x name
        "dtype": {"fp16": "float16"}.get(dtype, "float32"),  # the 5.x name
    }
    if rope:  # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta / rope_scaling
        fields["rope_parameters"] = rope
        fields["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("partial_rotary_factor") is not None:
            fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        fields["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if config.sliding_window:
        fields["sliding_window"] = config.sliding_window
    fields["sliced"] = {  # what the config above leaves out: where the real shapes are
        "canonical_config": CANONICAL_CONFIG,
        "residual_widths": list(config.residual_widths),
        "source_model": config.source_model,
        "compression": config.compression,
        "optimum_compatible": optimum_incompatibility(config) is None,
    }
    return fields


def canonical_config_path(export_dir: str | Path) -> Path:
    """The canonical config file of an export dir (exports before CANONICAL_CONFIG kept it in config.json)."""
    export_dir = Path(export_dir)
    canonical = export_dir / CANONICAL_CONFIG
    return canonical if canonical.is_file() else export_dir / CONFIG
