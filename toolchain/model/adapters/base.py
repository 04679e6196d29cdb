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

from toolchain.model.blocks import row_blocks
from toolchain.core.errors import UnsupportedArchitectureError
from toolchain.model.finite import require_finite_weight
from toolchain.model.modeling import SlicedConfig, SlicedForCausalLM


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


class TensorSource:
    """Read access to an HF checkpoint's tensors by name: a state dict in memory, or a lazily read
    safetensors checkpoint (see toolchain/streaming.py). `names` lists every tensor the source holds."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors
        self.names = frozenset(tensors)

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        require_finite_weight(name, tensor, "source weight")
        return tensor


def _fold_norm(state, norm: str, readers: list[str], dtype: torch.dtype) -> bool:
    """Fold norm scale γ and bias β into each reader: W ← W·diag(γ), b ← b + W·β (in float64,
    one tensor at a time). Returns whether the readers now carry a bias."""
    gamma = state.pop(f"{norm}.weight").to(torch.float64)
    beta = state.pop(f"{norm}.bias", None)
    beta = None if beta is None else beta.to(torch.float64)
    has_bias = beta is not None
    for reader in readers:
        weight = state[f"{reader}.weight"]
        bias = state.get(f"{reader}.bias")
        scaled = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        folded = None if beta is None else torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
        for rows in row_blocks(*weight.shape):  # float64 one row block at a time (V x D heads)
            wide = weight[rows].to(torch.float64)
            scaled[rows] = (wide * gamma[None, :]).to(dtype)
            if folded is not None:
                folded[rows] = wide @ beta
        if folded is not None:
            state[f"{reader}.bias"] = (folded + (bias.to(torch.float64) if bias is not None else 0)).to(dtype)
        state[f"{reader}.weight"] = scaled
        has_bias = has_bias or bias is not None
    return has_bias


def _centre(tensor: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    if dim == 1 and tensor.dim() == 2:  # rows centred independently: one float64 row block at a time
        out = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
        for rows in row_blocks(*tensor.shape):
            out[rows] = _centre(tensor[rows], -1, dtype)
        return out
    wide = tensor.to(torch.float64)
    return (wide - wide.mean(dim=dim, keepdim=True)).to(dtype)


def _centre_write(state, name: str, dtype: torch.dtype) -> None:
    """Make a write into the residual stream mean-free along the hidden dim.

    LayerNorm(x) = RMSNorm(x - mean(x)) * gamma + beta. If every write into the stream (embeddings,
    attention and MLP outputs) has zero mean along the hidden dim, their sum does too, so x - mean(x)
    = x and each LayerNorm becomes an RMSNorm with gamma and beta folded into the next linear layer.
    Centring a write is exact: subtracting the row mean of W's output equals multiplying by the
    centring matrix I - 11^T/D, a linear map the write can absorb."""
    state[f"{name}.weight"] = _centre(state[f"{name}.weight"], 0, dtype)
    if f"{name}.bias" in state:
        state[f"{name}.bias"] = _centre(state[f"{name}.bias"], 0, dtype)


def _split_fused(state, fused: str, names: list[str], sizes: list[int]) -> None:
    for suffix in ("weight", "bias"):
        key = f"{fused}.{suffix}"
        if key in state:
            for name, part in zip(names, torch.split(state.pop(key), sizes, dim=0)):
                state[f"{name}.{suffix}"] = part


def _layer_parts(adapter: Adapter) -> dict[str, str | None]:
    """Canonical module name (within a layer) → HF module name."""
    return dict(attn_norm=adapter.attn_norm, mlp_norm=adapter.mlp_norm, **{
        "attn.q_proj": adapter.q, "attn.k_proj": adapter.k, "attn.v_proj": adapter.v, "attn.o_proj": adapter.o,
        "mlp.up_proj": adapter.up, "mlp.gate_proj": adapter.gate, "mlp.down_proj": adapter.down,
        "attn.qkv": adapter.qkv, "mlp.gate_up": adapter.gate_up})


def _has_bias(names, src: str, adapter: Adapter, parts: list[str]) -> bool:
    table = _layer_parts(adapter)
    return any(table[p] and f"{src}.{table[p]}.bias" in names for p in parts)


def canonical_config(hf_config: PretrainedConfig, names, class_name: str | None = None,
                     source_model: str | None = None, keep_tie: bool = True) -> SlicedConfig:
    """The canonical config of an HF checkpoint, from its config and tensor *names* only (no weight is
    read): which biases exist after norm fusion follows from which norms and readers have one."""
    adapter = adapter_for(hf_config, class_name)
    fields = base_fields(hf_config) | adapter.config(hf_config)
    qkv_bias = up_bias = False
    attn = ["attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.qkv"]
    mlp = ["mlp.up_proj", "mlp.gate_proj", "mlp.gate_up"]
    for i in range(fields["num_hidden_layers"]):
        src = adapter.layers.format(i=i)
        if adapter.mlp_norm is None:  # parallel block: one norm (and its bias) feeds attention and MLP
            bias = _has_bias(names, src, adapter, attn + mlp)
            qkv_bias, up_bias = qkv_bias or bias, up_bias or bias
        else:
            qkv_bias = qkv_bias or _has_bias(names, src, adapter, attn)
            up_bias = up_bias or _has_bias(names, src, adapter, ["mlp_norm"] + mlp)
    src0 = adapter.layers.format(i=0)
    tied = keep_tie and bool(getattr(hf_config, "tie_word_embeddings", False)) and not adapter.layer_norm
    head_bias = not tied and any(f"{name}.bias" in names for name in (adapter.final_norm, adapter.lm_head))
    return SlicedConfig(
        **fields,
        gated_mlp=adapter.gate is not None or adapter.gate_up is not None,
        parallel_block=adapter.mlp_norm is None,
        qkv_bias=qkv_bias,
        o_bias=_has_bias(names, src0, adapter, ["attn.o_proj"]),
        mlp_up_bias=up_bias,
        mlp_down_bias=_has_bias(names, src0, adapter, ["mlp.down_proj"]),
        lm_head_bias=head_bias,
        tie_word_embeddings=tied,
        head_projection=tied,
        source_model=source_model,
        source_architecture=class_name or (list(hf_config.architectures or []) or [None])[0],
    )


def layer_state(adapter: Adapter, config: SlicedConfig, source: TensorSource, index: int,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Canonical tensors of layer `index` (names `layers.{index}.…`), norms folded (float64 per
    tensor, then `dtype`) and residual writes centred for LayerNorm models. Reads only this layer."""
    src, dst = adapter.layers.format(i=index), f"layers.{index}"
    state: dict[str, torch.Tensor] = {}
    for canonical, hf_name in _layer_parts(adapter).items():
        for suffix in ("weight", "bias"):
            if hf_name and f"{src}.{hf_name}.{suffix}" in source.names:
                state[f"{dst}.{canonical}.{suffix}"] = source.read(f"{src}.{hf_name}.{suffix}")
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inner = config.intermediate_size
    _split_fused(state, f"{dst}.attn.qkv", [f"{dst}.attn.{n}_proj" for n in "qkv"], [heads * hd, kv * hd, kv * hd])
    _split_fused(state, f"{dst}.mlp.gate_up", [f"{dst}.mlp.gate_proj", f"{dst}.mlp.up_proj"], [inner, inner])
    attn_readers = [f"{dst}.attn.{n}_proj" for n in "qkv"]
    mlp_readers = [f"{dst}.mlp.up_proj"] + ([f"{dst}.mlp.gate_proj"] if config.gated_mlp else [])
    if adapter.mlp_norm is None:
        _fold_norm(state, f"{dst}.attn_norm", attn_readers + mlp_readers, dtype)
    else:
        _fold_norm(state, f"{dst}.attn_norm", attn_readers, dtype)
        _fold_norm(state, f"{dst}.mlp_norm", mlp_readers, dtype)
    if adapter.layer_norm:
        _centre_write(state, f"{dst}.attn.o_proj", dtype)
        _centre_write(state, f"{dst}.mlp.down_proj", dtype)
    # a bias created by folding some layer's norm exists (as zeros) in every layer
    expected = {"attn.q_proj": config.qkv_bias, "attn.k_proj": config.qkv_bias, "attn.v_proj": config.qkv_bias,
                "mlp.up_proj": config.mlp_up_bias, "mlp.gate_proj": config.gated_mlp and config.mlp_up_bias}
    for name, wanted in expected.items():
        key = f"{dst}.{name}"
        if wanted and f"{key}.bias" not in state:
            state[f"{key}.bias"] = torch.zeros(state[f"{key}.weight"].shape[0], dtype=dtype)
    return {k: v.to(dtype) for k, v in state.items()}


def embedding_state(adapter: Adapter, config: SlicedConfig, source: TensorSource,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Token (and learned position) tables, centred along the hidden dim for LayerNorm models."""
    state = {"embed_tokens.weight": source.read(f"{adapter.embed}.weight")}
    if adapter.positions:
        state["embed_positions.weight"] = source.read(f"{adapter.positions}.weight")
    if adapter.layer_norm:
        return {k: _centre(v, 1, dtype) for k, v in state.items()}
    return {k: v.to(dtype) for k, v in state.items()}


def head_state(adapter: Adapter, config: SlicedConfig, source: TensorSource, dtype: torch.dtype = torch.float32,
               table: bool = True) -> dict[str, torch.Tensor]:
    """The head: the final norm's scale as a D x D `head_proj` (tied; the table is the embedding), or
    folded into the LM head. `table=False` skips reading the V x D head (tied or not)."""
    state = {f"norm.{s}": source.read(f"{adapter.final_norm}.{s}") for s in ("weight", "bias")
             if f"{adapter.final_norm}.{s}" in source.names}
    if config.tie_word_embeddings:
        return {"head_proj.weight": torch.diag(state["norm.weight"].to(dtype)).to(dtype)}
    if not table:
        return {}
    head = f"{adapter.lm_head}.weight"
    # a tied HF checkpoint stores the table once, under the embedding's name
    state["lm_head.weight"] = source.read(head if head in source.names else f"{adapter.embed}.weight")
    if f"{adapter.lm_head}.bias" in source.names:
        state["lm_head.bias"] = source.read(f"{adapter.lm_head}.bias")
    _fold_norm(state, "norm", ["lm_head"], dtype)
    return {k: v.to(dtype) for k, v in state.items()}


def to_canonical(hf_model, source_model: str | None = None, dtype: torch.dtype = torch.float32,
                 keep_tie: bool = True) -> SlicedForCausalLM:
    """Map an HF causal LM onto the canonical model with all norms fused (computed in float64).

    A tied RMSNorm model stays tied: the final norm's scale goes into a D x D `head_proj` instead
    of into a private copy of the V x D embedding (LayerNorm models are centred, which changes the
    embedding, so their head is untied)."""
    class_name = type(hf_model).__name__
    adapter = adapter_for(hf_model.config, class_name)
    source = TensorSource({k: v.detach() for k, v in hf_model.state_dict().items()})
    config = canonical_config(hf_model.config, source.names, class_name, source_model, keep_tie)
    state = embedding_state(adapter, config, source, dtype) | head_state(adapter, config, source, dtype)
    for i in range(config.num_hidden_layers):
        state |= layer_state(adapter, config, source, i, dtype)
    with torch.device("meta"):  # no random init: every weight comes from the state dict
        model = SlicedForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_derived_buffers()
    return model.eval()
