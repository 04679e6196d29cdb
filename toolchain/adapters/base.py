"""An adapter describes where an HF architecture keeps its weights, as data. `to_canonical` reads
that description, folds every norm's scale/bias into the linear layers that read it, centres the
residual writes of LayerNorm models, and returns the canonical model: numerically the same function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PretrainedConfig

from ..errors import UnsupportedArchitectureError
from ..model import SlicedConfig, SlicedForCausalLM


@dataclass(frozen=True)
class Adapter:
    architectures: tuple[str, ...]
    embed: str
    layers: str  # prefix of one layer, with {i}
    final_norm: str
    lm_head: str = "lm_head"
    positions: str | None = None  # learned position embedding (OPT)
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: parallel block reading attn_norm
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None  # fused rows [q; k; v]
    up: str = "mlp.up_proj"
    gate: str | None = "mlp.gate_proj"  # None: plain MLP
    down: str = "mlp.down_proj"
    gate_up: str | None = None  # fused rows [gate; up]
    layer_norm: bool = False  # LayerNorm (with mean): centre every residual write
    config: Callable[[PretrainedConfig], dict] = field(default=lambda cfg: {})


REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for name in adapter.architectures:
        REGISTRY[name] = adapter
    return adapter


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def adapter_for(hf_config: PretrainedConfig, class_name: str | None = None) -> Adapter:
    names = ([class_name] if class_name else []) + list(hf_config.architectures or [])
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name]
    found = ", ".join(names or [getattr(hf_config, "model_type", "?")])
    raise UnsupportedArchitectureError(
        f"architecture {found} is not supported; supported: {', '.join(supported_architectures())}"
    )


def base_fields(cfg: PretrainedConfig) -> dict:
    """Canonical config fields shared by every HF decoder config."""
    heads = cfg.num_attention_heads
    rope = copy.deepcopy(getattr(cfg, "rope_parameters", None))
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate_size=getattr(cfg, "intermediate_size", None),
        hidden_act=getattr(cfg, "hidden_act", "silu"),
        norm_eps=getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-5),
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope,
        sliding_window=getattr(cfg, "sliding_window", None),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if getattr(cfg, "original_max_position_embeddings", None):
        fields["original_max_position_embeddings"] = cfg.original_max_position_embeddings
    return fields


def _fold_norm(state, norm: str, readers: list[str], dtype: torch.dtype) -> bool:
    """Fold norm scale γ and bias β into each reader: W ← W·diag(γ), b ← b + W·β (in float64,
    one tensor at a time). Returns whether the readers now carry a bias."""
    gamma = state.pop(f"{norm}.weight").to(torch.float64)
    beta = state.pop(f"{norm}.bias", None)
    beta = None if beta is None else beta.to(torch.float64)
    has_bias = beta is not None
    for reader in readers:
        weight = state[f"{reader}.weight"].to(torch.float64)
        bias = state.get(f"{reader}.bias")
        if beta is not None:
            folded = weight @ beta + (bias.to(torch.float64) if bias is not None else 0)
            state[f"{reader}.bias"] = folded.to(dtype)
        state[f"{reader}.weight"] = (weight * gamma[None, :]).to(dtype)
        has_bias = has_bias or bias is not None
    return has_bias


def _centre(tensor: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    wide = tensor.to(torch.float64)
    return (wide - wide.mean(dim=dim, keepdim=True)).to(dtype)


def _centre_write(state, name: str, dtype: torch.dtype) -> None:
    """Make a write into the residual stream mean-free along the hidden dim."""
    state[f"{name}.weight"] = _centre(state[f"{name}.weight"], 0, dtype)
    if f"{name}.bias" in state:
        state[f"{name}.bias"] = _centre(state[f"{name}.bias"], 0, dtype)


def _split_fused(state, fused: str, names: list[str], sizes: list[int]) -> None:
    for suffix in ("weight", "bias"):
        key = f"{fused}.{suffix}"
        if key in state:
            for name, part in zip(names, torch.split(state.pop(key), sizes, dim=0)):
                state[f"{name}.{suffix}"] = part


def to_canonical(hf_model, source_model: str | None = None, dtype: torch.dtype = torch.float32,
                 keep_tie: bool = True) -> SlicedForCausalLM:
    """Map an HF causal LM onto the canonical model with all norms fused (computed in float64).

    A tied RMSNorm model stays tied: the final norm's scale goes into a D x D `head_proj` instead
    of into a private copy of the V x D embedding (LayerNorm models are centred, which changes the
    embedding, so their head is untied)."""
    cfg = hf_model.config
    adapter = adapter_for(cfg, type(hf_model).__name__)
    fields = base_fields(cfg) | adapter.config(cfg)
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    heads, kv, hd = fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"]
    inner = fields["intermediate_size"]

    # Gather under canonical names, splitting fused projections.
    state["embed_tokens.weight"] = hf_state[f"{adapter.embed}.weight"]
    if adapter.positions:
        state["embed_positions.weight"] = hf_state[f"{adapter.positions}.weight"]
    for suffix in ("weight", "bias"):
        if f"{adapter.lm_head}.{suffix}" in hf_state:
            state[f"lm_head.{suffix}"] = hf_state[f"{adapter.lm_head}.{suffix}"].clone()
    for suffix in ("weight", "bias"):
        if f"{adapter.final_norm}.{suffix}" in hf_state:
            state[f"norm.{suffix}"] = hf_state[f"{adapter.final_norm}.{suffix}"]
    parts = dict(attn_norm=adapter.attn_norm, mlp_norm=adapter.mlp_norm, **{
        "attn.q_proj": adapter.q, "attn.k_proj": adapter.k, "attn.v_proj": adapter.v, "attn.o_proj": adapter.o,
        "mlp.up_proj": adapter.up, "mlp.gate_proj": adapter.gate, "mlp.down_proj": adapter.down,
        "attn.qkv": adapter.qkv, "mlp.gate_up": adapter.gate_up})
    for i in range(fields["num_hidden_layers"]):
        src, dst = adapter.layers.format(i=i), f"layers.{i}"
        for canonical, hf_name in parts.items():
            for suffix in ("weight", "bias"):
                if hf_name and f"{src}.{hf_name}.{suffix}" in hf_state:
                    state[f"{dst}.{canonical}.{suffix}"] = hf_state[f"{src}.{hf_name}.{suffix}"]
        _split_fused(state, f"{dst}.attn.qkv", [f"{dst}.attn.{n}_proj" for n in "qkv"], [heads * hd, kv * hd, kv * hd])
        _split_fused(state, f"{dst}.mlp.gate_up", [f"{dst}.mlp.gate_proj", f"{dst}.mlp.up_proj"], [inner, inner])

    # Fold norms into their readers; centre residual writes for LayerNorm models.
    qkv_bias = up_bias = False
    for i in range(fields["num_hidden_layers"]):
        dst = f"layers.{i}"
        attn_readers = [f"{dst}.attn.{n}_proj" for n in "qkv"]
        mlp_readers = [f"{dst}.mlp.up_proj"] + ([f"{dst}.mlp.gate_proj"] if adapter.gate or adapter.gate_up else [])
        if adapter.mlp_norm is None:  # parallel block: one norm feeds attention and MLP
            bias = _fold_norm(state, f"{dst}.attn_norm", attn_readers + mlp_readers, dtype)
            qkv_bias, up_bias = qkv_bias or bias, up_bias or bias
        else:
            qkv_bias = _fold_norm(state, f"{dst}.attn_norm", attn_readers, dtype) or qkv_bias
            up_bias = _fold_norm(state, f"{dst}.mlp_norm", mlp_readers, dtype) or up_bias
        if adapter.layer_norm:
            _centre_write(state, f"{dst}.attn.o_proj", dtype)
            _centre_write(state, f"{dst}.mlp.down_proj", dtype)
    tied = keep_tie and bool(getattr(cfg, "tie_word_embeddings", False)) and not adapter.layer_norm
    if tied:
        state.pop("lm_head.weight", None)
        state["head_proj.weight"] = torch.diag(state.pop("norm.weight")).to(dtype)
        head_bias = False
    else:
        head_bias = _fold_norm(state, "norm", ["lm_head"], dtype)
    if adapter.layer_norm:
        for name in ("embed_tokens", "embed_positions"):
            if f"{name}.weight" in state:
                state[f"{name}.weight"] = _centre(state[f"{name}.weight"], 1, dtype)

    layer0 = "layers.0"
    config = SlicedConfig(
        **fields,
        gated_mlp=adapter.gate is not None or adapter.gate_up is not None,
        parallel_block=adapter.mlp_norm is None,
        qkv_bias=qkv_bias,
        o_bias=f"{layer0}.attn.o_proj.bias" in state,
        mlp_up_bias=up_bias,
        mlp_down_bias=f"{layer0}.mlp.down_proj.bias" in state,
        lm_head_bias=head_bias,
        tie_word_embeddings=tied,
        head_projection=tied,
        source_model=source_model,
        source_architecture=type(hf_model).__name__,
    )
    _fill_missing_biases(state, config, dtype)
    with torch.device("meta"):  # no random init: every weight comes from the state dict
        model = SlicedForCausalLM(config)
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_derived_buffers()
    return model.eval()


def _fill_missing_biases(state, config: SlicedConfig, dtype: torch.dtype) -> None:
    """A bias created by folding one layer's norm must exist (as zeros) in every layer."""
    expected = {"attn.q_proj": config.qkv_bias, "attn.k_proj": config.qkv_bias, "attn.v_proj": config.qkv_bias,
                "mlp.up_proj": config.mlp_up_bias}
    if config.gated_mlp:
        expected["mlp.gate_proj"] = config.mlp_up_bias
    for i in range(config.num_hidden_layers):
        for name, wanted in expected.items():
            key = f"layers.{i}.{name}"
            if wanted and f"{key}.bias" not in state:
                state[f"{key}.bias"] = torch.zeros(state[f"{key}.weight"].shape[0], dtype=dtype)
