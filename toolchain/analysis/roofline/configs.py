"""Model configs the planner reads offline: built-in public shapes, local config.json files, or a hub
id already in the Hugging Face cache; and the size model's description of them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from toolchain.core.errors import ArtifactError, ModelNotFoundError
from toolchain.model import sizes

ModelShape = sizes.Decoder  # what the planner needs from a config


def _llama(hidden, inter, layers, heads, kv, vocab, **extra) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": False, **extra}


def _opt(hidden, ffn, layers, heads) -> dict:
    return {"model_type": "opt", "hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": hidden, "do_layer_norm_before": True, "enable_bias": True,
            "tie_word_embeddings": True}


# Shape fields of public config.json files, keyed by hub id; `short` is what users type.
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000, short="llama-2-7b"),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000, short="llama-2-13b"),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000, short="llama-2-70b"),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, short="llama-3-8b"),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, short="llama-3-70b"),
    "meta-llama/Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8, 128256, short="llama-3.1-8b"),
    "meta-llama/Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_word_embeddings=True,
                                      short="llama-3.2-1b"),
    "meta-llama/Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, 128256, head_dim=128, tie_word_embeddings=True,
                                      short="llama-3.2-3b"),
    "HuggingFaceTB/SmolLM2-135M": _llama(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True, short="smollm2-135m"),
    "HuggingFaceTB/SmolLM2-360M": _llama(960, 2560, 32, 15, 5, 49152, tie_word_embeddings=True, short="smollm2-360m"),
    "HuggingFaceTB/SmolLM2-1.7B": _llama(2048, 8192, 24, 32, 32, 49152, tie_word_embeddings=True,
                                         short="smollm2-1.7b"),
    "mistralai/Mistral-7B-v0.1": {**_llama(4096, 14336, 32, 32, 8, 32000), "model_type": "mistral",
                                  "short": "mistral-7b"},
    "Qwen/Qwen2-0.5B": {**_llama(896, 4864, 24, 14, 2, 151936), "model_type": "qwen2", "tie_word_embeddings": True,
                        "short": "qwen2-0.5b"},
    "Qwen/Qwen2-1.5B": {**_llama(1536, 8960, 28, 12, 2, 151936), "model_type": "qwen2", "tie_word_embeddings": True,
                        "short": "qwen2-1.5b"},
    "Qwen/Qwen2-7B": {**_llama(3584, 18944, 28, 28, 4, 152064), "model_type": "qwen2", "short": "qwen2-7b"},
    "microsoft/Phi-3-mini-4k-instruct": {**_llama(3072, 8192, 32, 32, 32, 32064), "model_type": "phi3",
                                         "short": "phi-3-mini"},
    "microsoft/phi-2": {"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
                        "vocab_size": 51200, "partial_rotary_factor": 0.4, "qk_layernorm": False,
                        "tie_word_embeddings": False, "short": "phi-2"},
    "facebook/opt-125m": {**_opt(768, 3072, 12, 12), "short": "opt-125m"},
    "facebook/opt-1.3b": {**_opt(2048, 8192, 24, 32), "short": "opt-1.3b"},
    "facebook/opt-2.7b": {**_opt(2560, 10240, 32, 32), "short": "opt-2.7b"},
    "facebook/opt-6.7b": {**_opt(4096, 16384, 32, 32), "short": "opt-6.7b"},
    "facebook/opt-13b": {**_opt(5120, 20480, 40, 40), "short": "opt-13b"},
    "facebook/opt-30b": {**_opt(7168, 28672, 48, 56), "short": "opt-30b"},
    "facebook/opt-66b": {**_opt(9216, 36864, 64, 72), "short": "opt-66b"},
}


def known_config(spec: str) -> dict | None:
    """The built-in config for a short name or hub id (case-insensitive), or None."""
    key = spec.strip().lower()
    for hub_id, cfg in KNOWN_CONFIGS.items():
        if key in (hub_id.lower(), cfg["short"]):
            return {**cfg, "_name_or_path": hub_id}
    return None


def resolve_config(spec: str) -> dict:
    """--model for planning -> config dict: built-in short name / hub id, a local dir or config.json,
    or a hub id whose config.json is already in the Hugging Face cache. Never touches the network."""
    text = str(spec).strip()
    if not text:
        raise ModelNotFoundError("--model is empty; pass a short name (e.g. llama-2-7b), a dir or a config.json")
    known = known_config(text)
    if known is not None:
        return known
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{path.parent} has no config.json; pass the checkpoint dir or its config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"{path} is a GGUF file; the planner reads config.json, so pass the checkpoint dir "
                                 "`toolchain` converted it into, or the original model's short name / config.json")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path} is not valid JSON ({err}); pass a Hugging Face config.json") from err
        if not isinstance(cfg, dict):
            raise ArtifactError(f"{path} is not a JSON object; pass a Hugging Face config.json")
        return {"_name_or_path": str(path.parent if path.name == "config.json" else path), **cfg}
    cached = _cached_hub_config(text)
    if cached is not None:
        return cached
    shorts = ", ".join(cfg["short"] for cfg in KNOWN_CONFIGS.values())
    raise ModelNotFoundError(
        f"{text} is not a built-in name, a local dir/config.json, or a hub id with config.json in the Hugging Face "
        f"cache; pass one of {shorts}, or copy the model's config.json here and pass its path "
        f"(on a machine with internet: `hf download {text} config.json`)")


def _cached_hub_config(repo_id: str) -> dict | None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001  (no hub library or a malformed cache: treat as not cached)
        return None
    if not isinstance(found, (str, os.PathLike)):
        return None
    return {"_name_or_path": repo_id, **json.loads(Path(found).read_text(encoding="utf-8"))}




def model_shape(config: Any) -> sizes.Decoder:
    """The size model's Decoder of a config dict, a config.json path/dir, a built-in name or a
    transformers config."""
    if isinstance(config, (str, os.PathLike)):
        config = resolve_config(str(config))
    elif not isinstance(config, Mapping) and hasattr(config, "to_dict"):
        config = config.to_dict()
    return sizes.describe(config)
