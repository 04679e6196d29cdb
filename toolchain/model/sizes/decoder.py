"""What sizes a decoder: every weight's shape follows from a handful of counts and flags.

`Decoder` describes both a dense Hugging Face checkpoint (norms with weights, nothing fused) and the
canonical model (`SlicedConfig`: weightless norms, per-position residual widths, shortcut matrices,
per-layer head and MLP dims). It is built from a config alone, so nothing here reads a weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from toolchain.core.errors import InvalidOptionError, UnsupportedArchitectureError

HF_ARCHS = ("llama", "mistral", "qwen2", "phi3", "opt", "phi")


@dataclass(frozen=True)
class Decoder:
    """Shapes of every weight of a decoder-only LM.

    Residual position p (two per sequential layer, one per parallel layer, then the head's) has width
    `residual_widths[p]`; `shortcuts[p]` is a d_p x d_{p+1} matrix carrying the residual to p+1."""

    name: str
    arch: str  # HF model_type, or "sliced_decoder" for the canonical model
    vocab_size: int
    hidden_size: int  # D, the original residual width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dims: tuple[int, ...]  # per layer
    v_head_dims: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    gated_mlp: bool
    parallel_block: bool
    residual_widths: tuple[int, ...]
    shortcuts: tuple[bool, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_up_bias: bool = False
    mlp_down_bias: bool = False
    lm_head_bias: bool = False
    rotary_dim: int = 0  # RoPE dims per head (0: learned positions)
    position_rows: int = 0  # rows of a learned position table
    tied: bool = False  # the LM head is the token table (counted once)
    table_width: int | None = None  # token table columns when read through embed_proj; None: d_0
    embed_proj: bool = False  # table_width x d_0 (canonical --tie project; OPT-350m's project_in)
    head_proj: bool = False  # d_L x head input (a tied canonical model's final-norm scale)
    position_width: int | None = None  # learned position table width; None: the token table's
    layer_norm: bool = False  # the HF norms are LayerNorms (scale and bias)
    norm_params: int = 0  # weights of one norm: 0 once fused (canonical), D (RMSNorm) or 2D (LayerNorm)
    qk_norm_params: int = 0  # per layer: Phi's optional per-head q/k LayerNorms
    post_norm: bool = False  # OPT-350m: post-LayerNorm blocks, which cannot be sliced
    compression: dict = field(default_factory=dict, compare=False)  # what produced it (planned or saved)

    @property
    def positions(self) -> int:
        return self.num_layers * (1 if self.parallel_block else 2)

    @property
    def fused(self) -> bool:
        return self.arch == "sliced_decoder"

    @property
    def is_sliced(self) -> bool:
        """A canonical model whose residual stream was rotated (it has shortcuts or narrower widths)."""
        return self.fused and (any(self.shortcuts) or any(w != self.hidden_size for w in self.residual_widths))

    @property
    def head_width(self) -> int:
        """Columns of the LM head: the token table's when tied, else the head position's width."""
        return self.embedding_width if self.tied and self.head_proj else self.residual_widths[-1]

    @property
    def embedding_width(self) -> int:
        return self.table_width if self.embed_proj and self.table_width else self.residual_widths[0]

    def layer_positions(self, layer: int) -> tuple[int, int]:
        """Residual positions read by (attention, MLP) of `layer`; each writes the next position."""
        return (layer, layer) if self.parallel_block else (2 * layer, 2 * layer + 1)

    def replace(self, **changes) -> "Decoder":
        return replace(self, **changes)


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # transformers.PretrainedConfig (SlicedConfig included)
        return config.to_dict()
    raise InvalidOptionError(f"cannot read a model config from {type(config).__name__}; pass a dict or a config")


def _need(cfg: dict, *keys: str, name: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise UnsupportedArchitectureError(f"{name}: config lacks {keys[0]!r}; pass a complete Hugging Face config.json")


def _per_layer(cfg: dict, key: str, layers: int, default: int) -> tuple[int, ...]:
    value = cfg.get(key)
    if value is None:
        return (default,) * layers
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * layers


def _rotary_fraction(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0))


def describe(config: Any) -> Decoder:
    """Decoder of a config: a dict, a transformers config (HF or SlicedConfig) or a model's `.config`."""
    cfg = _as_dict(config)
    arch = str(cfg.get("model_type", ""))
    name = str(cfg.get("_name_or_path") or arch or "model")
    if arch == "sliced_decoder" or "residual_widths" in cfg:
        return _canonical(cfg, name)
    hidden = _need(cfg, "hidden_size", "d_model", name=name)
    layers = _need(cfg, "num_hidden_layers", "n_layer", name=name)
    heads = _need(cfg, "num_attention_heads", "n_head", name=name)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    n_pos = layers * (1 if arch == "phi" else 2)
    common = dict(name=name, arch=arch, vocab_size=_need(cfg, "vocab_size", name=name), hidden_size=hidden,
                  num_layers=layers, num_heads=heads, num_kv_heads=kv, qk_head_dims=(head_dim,) * layers,
                  v_head_dims=(head_dim,) * layers, residual_widths=(hidden,) * (n_pos + 1),
                  shortcuts=(False,) * n_pos)
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        inter = _need(cfg, "intermediate_size", name=name)
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        return Decoder(**common, intermediate_sizes=(inter,) * layers, gated_mlp=True, parallel_block=False,
                       qkv_bias=attn_bias or arch == "qwen2", o_bias=attn_bias, mlp_up_bias=mlp_bias,
                       mlp_down_bias=mlp_bias, rotary_dim=int(head_dim * _rotary_fraction(cfg)),
                       tied=bool(cfg.get("tie_word_embeddings", False)), norm_params=hidden)
    if arch == "opt":
        inter = _need(cfg, "ffn_dim", name=name)
        bias = bool(cfg.get("enable_bias", True))
        proj = int(cfg.get("word_embed_proj_dim") or hidden)
        affine = bool(cfg.get("layer_norm_elementwise_affine", True))
        return Decoder(**common, intermediate_sizes=(inter,) * layers, gated_mlp=False, parallel_block=False,
                       qkv_bias=bias, o_bias=bias, mlp_up_bias=bias, mlp_down_bias=bias,
                       position_rows=int(cfg.get("max_position_embeddings", 2048)) + 2, position_width=hidden,
                       tied=bool(cfg.get("tie_word_embeddings", True)), table_width=proj,
                       embed_proj=proj != hidden, head_proj=proj != hidden, layer_norm=True,
                       norm_params=2 * hidden if affine else 0, post_norm=not cfg.get("do_layer_norm_before", True))
    if arch == "phi":
        inter = _need(cfg, "intermediate_size", name=name)
        return Decoder(**common, intermediate_sizes=(inter,) * layers, gated_mlp=False, parallel_block=True,
                       qkv_bias=True, o_bias=True, mlp_up_bias=True, mlp_down_bias=True, lm_head_bias=True,
                       rotary_dim=int(head_dim * _rotary_fraction(cfg)),
                       tied=bool(cfg.get("tie_word_embeddings", False)), layer_norm=True, norm_params=2 * hidden,
                       qk_norm_params=4 * head_dim if cfg.get("qk_layernorm", False) else 0)
    raise UnsupportedArchitectureError(
        f"{name}: model_type {arch!r} is not one the size model knows; supported: {', '.join(HF_ARCHS)} and "
        "sliced_decoder")


def _canonical(cfg: dict, name: str) -> Decoder:
    """toolchain.model.modeling.SlicedConfig, field by field (the same defaults)."""
    hidden = _need(cfg, "hidden_size", name=name)
    layers = _need(cfg, "num_hidden_layers", name=name)
    heads = _need(cfg, "num_attention_heads", name=name)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    parallel = bool(cfg.get("parallel_block", False))
    n_pos = layers * (1 if parallel else 2)
    widths = [int(w) for w in (cfg.get("residual_widths") or [hidden] * (n_pos + 1))]
    if len(widths) == n_pos:  # no head entry: the head reads the full width
        widths.append(hidden)
    shortcuts = [bool(s) for s in (cfg.get("shortcuts") or [False] * n_pos)]
    inter = _per_layer(cfg, "intermediate_sizes", layers, int(cfg.get("intermediate_size") or 4 * hidden))
    if len(widths) != n_pos + 1 or len(shortcuts) != n_pos or len(inter) != layers:
        raise UnsupportedArchitectureError(
            f"{name}: residual_widths needs {n_pos + 1} entries, shortcuts {n_pos} and intermediate_sizes {layers}; "
            "the config.json is inconsistent, re-save the model")
    learned = cfg.get("position_embedding") == "learned"
    rows = int(cfg.get("max_position_embeddings", 0)) + int(cfg.get("learned_position_offset", 0)) if learned else 0
    projected = bool(cfg.get("embed_projection", False))
    return Decoder(
        name=name, arch="sliced_decoder", vocab_size=_need(cfg, "vocab_size", name=name), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv,
        qk_head_dims=_per_layer(cfg, "qk_head_dims", layers, head_dim),
        v_head_dims=_per_layer(cfg, "v_head_dims", layers, head_dim), intermediate_sizes=inter,
        gated_mlp=bool(cfg.get("gated_mlp", True)), parallel_block=parallel, residual_widths=tuple(widths),
        shortcuts=tuple(shortcuts), qkv_bias=bool(cfg.get("qkv_bias", False)), o_bias=bool(cfg.get("o_bias", False)),
        mlp_up_bias=bool(cfg.get("mlp_up_bias", False)), mlp_down_bias=bool(cfg.get("mlp_down_bias", False)),
        lm_head_bias=bool(cfg.get("lm_head_bias", False)),
        rotary_dim=0 if learned else int(head_dim * _rotary_fraction(cfg)), position_rows=rows,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        table_width=int(cfg.get("embedding_width") or hidden) if projected else None, embed_proj=projected,
        head_proj=bool(cfg.get("head_projection", False)), compression=dict(cfg.get("compression") or {}))


def canonical(dense: Decoder, tie: str = "slice") -> Decoder:
    """The canonical model `to_canonical` makes of a dense HF checkpoint (adapters/base.py).

    Norms fold into the linears that read them: RMSNorm scales vanish into weights; a LayerNorm's bias
    becomes a bias of every reader (q/k/v, MLP up/gate, the head). A tied RMSNorm model stays tied unless
    `tie == "untie"`, its final-norm scale kept in a D x D head_proj; LayerNorm models are centred, which
    changes the table, so their head is untied."""
    if dense.fused:
        return dense
    if dense.post_norm or dense.embed_proj:
        raise UnsupportedArchitectureError(
            f"{dense.name}: post-LayerNorm or projected-embedding OPT variants (opt-350m) have no canonical form; "
            "pick another OPT size")
    ln = dense.layer_norm and dense.norm_params > 0
    tied = dense.tied and tie != "untie" and not dense.layer_norm
    return dense.replace(
        arch="sliced_decoder", qkv_bias=dense.qkv_bias or ln, mlp_up_bias=dense.mlp_up_bias or ln,
        lm_head_bias=not tied and (dense.lm_head_bias or ln), tied=tied, head_proj=tied, table_width=None,
        embed_proj=False, position_width=None, norm_params=0, qk_norm_params=0, layer_norm=False)


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint dir (or the file itself) as a dict."""
    import json
    from pathlib import Path

    path = Path(path)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
