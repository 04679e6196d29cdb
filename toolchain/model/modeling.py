"""The canonical decoder: one forward that every supported architecture maps onto after norm fusion.

Residual stream layout. The residual stream is read at *positions*: a sequential block (attention,
then MLP) has two per layer, a parallel block (Phi-2) one. Position p has width
`residual_widths[p]`; `residual_widths[-1]` is the width the final norm and LM head read.
A block at position p reads norm(h_p) and writes into position p+1; the residual itself moves
from p to p+1 through `shortcut` (a d_{p+1} x d_p matrix) when `shortcuts[p]` is set, else as is.

Norms are weightless after fusion (their scale and bias live in the linear layers that read them).
A weightless RMSNorm over the original width D applied to a sliced width d equals a standard
RMSNorm over d with eps' = eps*D/d and weight sqrt(D/d); that standard form is what runs here,
so exported graphs contain the pattern runtimes fuse.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class SlicedConfig(PretrainedConfig):
    model_type = "sliced_decoder"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 1024,
        hidden_act: str = "silu",
        gated_mlp: bool = True,
        parallel_block: bool = False,
        norm_eps: float = 1e-5,
        max_position_embeddings: int = 2048,
        position_embedding: str = "rope",  # "rope" | "learned"
        learned_position_offset: int = 0,
        rope_parameters: dict | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_up_bias: bool = False,
        mlp_down_bias: bool = False,
        lm_head_bias: bool = False,
        sliding_window: int | None = None,
        attention_scale: float | None = None,
        residual_widths: list[int] | None = None,
        shortcuts: list[bool] | None = None,
        intermediate_sizes: list[int] | None = None,
        qk_head_dims: list[int] | None = None,
        v_head_dims: list[int] | None = None,
        rope_pair_index: list[list[list[int]] | None] | None = None,
        tie_word_embeddings: bool = False,
        embedding_width: int | None = None,
        embed_projection: bool = False,
        head_projection: bool = False,
        initializer_range: float = 0.02,
        source_model: str | None = None,
        source_architecture: str | None = None,
        compression: dict | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.parallel_block = parallel_block
        self.norm_eps = norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.learned_position_offset = learned_position_offset
        self.rope_parameters = rope_parameters
        self.qkv_bias, self.o_bias = qkv_bias, o_bias
        self.mlp_up_bias, self.mlp_down_bias, self.lm_head_bias = mlp_up_bias, mlp_down_bias, lm_head_bias
        self.sliding_window = sliding_window
        self.attention_scale = attention_scale if attention_scale is not None else self.head_dim**-0.5
        n_pos = num_hidden_layers * (1 if parallel_block else 2)
        self.residual_widths = list(residual_widths or [hidden_size] * (n_pos + 1))
        self.shortcuts = list(shortcuts or [False] * n_pos)
        self.intermediate_sizes = list(intermediate_sizes or [intermediate_size] * num_hidden_layers)
        self.qk_head_dims = list(qk_head_dims or [self.head_dim] * num_hidden_layers)
        self.v_head_dims = list(v_head_dims or [self.head_dim] * num_hidden_layers)
        # Tied embeddings survive rotation through explicit end matrices: the token table has
        # `embedding_width` columns; `embed_proj` maps it to the first residual width and
        # `head_proj` maps the final normed residual back to it. One table can serve both ends
        # because rotating it keeps the tie (row vectors): with E' = E Q, the embedding E'[t] = E[t] Q
        # is the token in the rotated basis, and the head's logits y E^T = (y Q)(E Q)^T = (y Q) E'^T
        # since Q Q^T = I, so the head reads y Q. `head_proj` takes the final stream into that basis;
        # two width x width matrices cost far less than a second V x D head.
        self.embed_projection, self.head_projection = embed_projection, head_projection
        self.embedding_width = embedding_width or hidden_size  # used only with embed_projection
        # MoDeGPT: per layer, None (every RoPE pair, in order) or, per KV head, the frequency index of
        # each RoPE pair the reduced q/k head keeps (the same count for every head of a layer)
        self.rope_pair_index = list(rope_pair_index or [None] * num_hidden_layers)
        self.initializer_range = initializer_range
        self.source_model = source_model
        self.source_architecture = source_architecture
        self.compression = compression
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if len(self.residual_widths) != n_pos + 1 or len(self.shortcuts) != n_pos:
            raise ValueError(f"residual_widths needs {n_pos + 1} entries and shortcuts {n_pos}")
        if len(self.rope_pair_index) != num_hidden_layers:
            raise ValueError(f"rope_pair_index needs {num_hidden_layers} entries (None or per-KV-head pair lists)")

    @property
    def num_positions(self) -> int:
        return len(self.shortcuts)

    def layer_positions(self, layer: int) -> tuple[int, int]:
        """Residual positions read by (attention, MLP) of `layer`."""
        return (layer, layer) if self.parallel_block else (2 * layer, 2 * layer + 1)

    @property
    def rotary_dim(self) -> int:
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        return int(self.head_dim * factor)

    def qk_rotary_dim(self, layer: int) -> int:
        """Rotary width of `layer`'s q/k heads: twice the kept RoPE pairs when reduced, else rotary_dim."""
        pairs = self.rope_pair_index[layer]
        return self.rotary_dim if pairs is None else 2 * len(pairs[0])


def rope_inverse_frequencies(config: SlicedConfig) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin scaling, from transformers' own RoPE init functions."""
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        dim = config.rotary_dim
        base = params.get("rope_theta", 10000.0)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: SlicedConfig):
        super().__init__()
        inv_freq, self.scaling = rope_inverse_frequencies(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of every head (partial rotary leaves the rest alone).
    cos/sin: (batch, seq, rot) shared by all heads, or (batch, heads, seq, rot) per head."""
    rot = cos.shape[-1]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def kept_pairs_rope(cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor):
    """Per-head cos/sin (batch, heads, seq, 2n) for heads that keep n RoPE pairs each.

    The global cos/sin (batch, seq, rot) hold the rot/2 frequencies twice (rotate_half layout);
    `pairs` (heads, n) names the frequency of each kept pair, laid out again as [firsts | seconds].
    """
    half = cos.shape[-1] // 2

    def gather(t):
        t = t[..., :half][..., pairs].transpose(1, 2)  # (batch, heads, seq, n)
        return torch.cat((t, t), dim=-1)

    return gather(cos), gather(sin)


class ResidualNorm(nn.Module):
    """Weightless RMSNorm over the original width, written as a standard RMSNorm over `width`.

    Before slicing, a rotation Q leaves the norm unchanged: ||hQ|| = ||h||, so RMSNorm(hQ) = RMSNorm(h)Q.
    After keeping d of D columns, ||hQ_d|| < ||h|| in general: the norm divides by the kept part only.
    SliceGPT accepts that approximation (PCA keeps the directions carrying most of the energy, so the
    two norms stay close). Dividing the kept sum of squares by the original width D, as
    sum(x^2)/D = (d/D) * mean(x^2), is the same as a standard RMSNorm over d with eps' = eps*D/d and a
    weight of sqrt(D/d), the form ONNX Runtime and TensorRT fuse.
    """

    def __init__(self, width: int, full_width: int, eps: float):
        super().__init__()
        self.width = width
        self.eps = eps * full_width / width
        self.weight = nn.Buffer(torch.full((width,), math.sqrt(full_width / width)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp16/bf16 inputs are normalised in fp32; fp64 stays fp64 (the invariance checks need it)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.rms_norm(x.to(compute), (self.width,), self.weight.to(compute), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: SlicedConfig, layer: int, in_width: int, out_width: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qk_dim, self.v_dim = config.qk_head_dims[layer], config.v_head_dims[layer]
        self.scale = config.attention_scale
        self.q_proj = nn.Linear(in_width, self.heads * self.qk_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(in_width, self.kv_heads * self.qk_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(in_width, self.kv_heads * self.v_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.v_dim, out_width, bias=config.o_bias)
        pairs = config.rope_pair_index[layer]
        self.register_buffer("rope_pairs", None if pairs is None else torch.tensor(pairs, dtype=torch.long),
                             persistent=False)

    def forward(self, x, rope, mask, cache):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.v_dim).transpose(1, 2)
        if rope is not None and self.rope_pairs is not None:
            # reduced heads: each KV head (and the q heads of its group) keeps its own frequencies
            cos, sin = kept_pairs_rope(*rope, self.rope_pairs)
            groups = self.heads // self.kv_heads
            q = apply_rope(q, cos.repeat_interleave(groups, dim=1), sin.repeat_interleave(groups, dim=1))
            k = apply_rope(k, cos, sin)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
            # a sliding-window cache (what generate builds for Mistral) keeps only the newest keys, all
            # others being outside the window: the bias columns of the dropped keys go too
            mask = mask[..., -k.shape[2]:]
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.v_dim))


class MLP(nn.Module):
    def __init__(self, config: SlicedConfig, layer: int, in_width: int, out_width: int):
        super().__init__()
        inner = config.intermediate_sizes[layer]
        self.act = ACT2FN[config.hidden_act]
        self.up_proj = nn.Linear(in_width, inner, bias=config.mlp_up_bias)
        self.gate_proj = nn.Linear(in_width, inner, bias=config.mlp_up_bias) if config.gated_mlp else None
        self.down_proj = nn.Linear(inner, out_width, bias=config.mlp_down_bias)

    def forward(self, x):
        up = self.up_proj(x)
        hidden = self.act(self.gate_proj(x)) * up if self.gate_proj is not None else self.act(up)
        return self.down_proj(hidden)


def _shortcut(config: SlicedConfig, position: int) -> nn.Linear | None:
    widths = config.residual_widths
    if not config.shortcuts[position]:
        if widths[position] != widths[position + 1]:
            raise ValueError(f"residual width changes at position {position} but it has no shortcut")
        return None
    return nn.Linear(widths[position], widths[position + 1], bias=False)


def _carry(shortcut: nn.Linear | None, h: torch.Tensor) -> torch.Tensor:
    return h if shortcut is None else shortcut(h)


class DecoderLayer(nn.Module):
    def __init__(self, config: SlicedConfig, layer: int):
        super().__init__()
        widths, full = config.residual_widths, config.hidden_size
        attn_pos, mlp_pos = config.layer_positions(layer)
        self.parallel = config.parallel_block
        self.attn_norm = ResidualNorm(widths[attn_pos], full, config.norm_eps)
        self.attn = Attention(config, layer, widths[attn_pos], widths[attn_pos + 1])
        self.attn_shortcut = _shortcut(config, attn_pos)
        self.mlp_norm = None if self.parallel else ResidualNorm(widths[mlp_pos], full, config.norm_eps)
        self.mlp = MLP(config, layer, widths[mlp_pos], widths[mlp_pos + 1])
        self.mlp_shortcut = None if self.parallel else _shortcut(config, mlp_pos)

    def forward(self, h, rope, mask, cache):
        if self.parallel:
            x = self.attn_norm(h)
            return _carry(self.attn_shortcut, h) + self.attn(x, rope, mask, cache) + self.mlp(x)
        h = _carry(self.attn_shortcut, h) + self.attn(self.attn_norm(h), rope, mask, cache)
        return _carry(self.mlp_shortcut, h) + self.mlp(self.mlp_norm(h))


def attention_bias(
    attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive (batch, 1, query, key) bias: causal over the whole cache, padding keys masked.

    Uses the dtype's minimum rather than -inf so a fully padded query row stays finite.
    """
    total = attention_mask.shape[-1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - query_len :] if query_len <= total else key_pos
    allowed = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (key_pos[None, :] > query_pos[:, None] - sliding_window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class ListCache:
    """A minimal KV cache over explicit tensors (used by exporters): `update` concatenates the past
    with the new keys/values and records the result as the layer's present."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get_seq_length(self) -> int:
        return self.past[0][0].shape[2] if self.past else 0

    def update(self, key, value, layer):
        past_key, past_value = self.past[layer]
        key, value = torch.cat((past_key, key), dim=2), torch.cat((past_value, value), dim=2)
        self.present.append((key, value))
        return key, value


# transformers up to 5.23 names the KV cache `past_key_values`; from 5.24 `generate` passes `cache=`
# and reads `outputs.cache`. Both names are accepted; the output uses the installed version's field.
OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_OTHER_CACHE_NAMES = ("cache_params", "layer_past", "past", "kv_cache", "mems", "state")


def given_cache(cache, past_key_values, extra: dict):
    """The one KV cache a caller passed, under either name. Anything that looks like a cache in a form
    this model does not read is an error: starting a fresh cache instead would attend to one token
    per step and still produce plausible text."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two different KV caches were passed (cache= and past_key_values=); pass one")
    found = cache if cache is not None else past_key_values
    strays = [name for name, value in extra.items()
              if name in _OTHER_CACHE_NAMES or isinstance(value, (Cache, ListCache))]
    if strays:
        raise TypeError(f"SlicedForCausalLM.forward got a KV cache as {', '.join(strays)}=; pass it as cache= "
                        "(or past_key_values=)")
    if found is not None and not isinstance(found, (Cache, ListCache)):
        raise TypeError(f"unsupported KV cache type {type(found).__name__}; pass a transformers Cache such as "
                        "DynamicCache (legacy tuples: DynamicCache(list_of_key_value_pairs))")
    return found


class SlicedPreTrainedModel(PreTrainedModel):
    config_class = SlicedConfig
    config: SlicedConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # transformers.initialization ops respect from_pretrained's "already loaded" flags; the
        # non-persistent buffers (RoPE frequencies, norm scales) are derived from the config here.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif (name := self._derived_buffer_name(module)) is not None:
            init.copy_(getattr(module, name), self._derived_buffer(module))

    @staticmethod
    def _derived_buffer_name(module) -> str | None:
        """Name of the config-derived (non-persistent) buffer a module holds, if any."""
        if isinstance(module, RotaryEmbedding):
            return "inv_freq"
        if isinstance(module, ResidualNorm):
            return "weight"
        if isinstance(module, Attention) and module.rope_pairs is not None:
            return "rope_pairs"
        return None

    def _derived_buffer(self, module) -> torch.Tensor:
        if isinstance(module, RotaryEmbedding):
            return rope_inverse_frequencies(self.config)[0]
        if isinstance(module, Attention):
            return torch.tensor(self.config.rope_pair_index[module.layer])
        return torch.full((module.width,), math.sqrt(self.config.hidden_size / module.width))

    def init_derived_buffers(self) -> None:
        """Materialise the config-derived buffers of a model built on the meta device."""
        for module in self.modules():
            if (name := self._derived_buffer_name(module)) is not None:
                setattr(module, name, nn.Buffer(self._derived_buffer(module), persistent=False))


class SlicedForCausalLM(SlicedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: SlicedConfig):
        super().__init__(config)
        widths = config.residual_widths
        table = config.embedding_width if config.embed_projection else widths[0]
        self.embed_tokens = nn.Embedding(config.vocab_size, table)
        self.embed_positions = None
        if config.position_embedding == "learned":
            rows = config.max_position_embeddings + config.learned_position_offset
            self.embed_positions = nn.Embedding(rows, table)
        self.embed_proj = nn.Linear(table, widths[0], bias=False) if config.embed_projection else None
        self.rotary = RotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.layers = nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.num_hidden_layers))
        self.norm = ResidualNorm(widths[-1], config.hidden_size, config.norm_eps)
        head_in = table if config.tie_word_embeddings else widths[-1]
        self.head_proj = nn.Linear(widths[-1], head_in, bias=False) if config.head_projection else None
        self.lm_head = nn.Linear(head_in, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def hidden_input(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Residual stream at position 0."""
        h = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            h = h + self.embed_positions(position_ids + self.config.learned_position_offset)
        if self.embed_proj is not None:
            h = self.embed_proj(h)
        return h

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return None if self.rotary is None else self.rotary(position_ids, dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | ListCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | ListCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        batch, seq = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past_key_values = given_cache(cache, past_key_values, kwargs)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=device).expand(batch, seq)

        if inputs_embeds is None:
            h = self.hidden_input(input_ids, position_ids)
        else:  # embeddings given in the token table's space
            h = inputs_embeds
            if self.embed_positions is not None:
                h = h + self.embed_positions(position_ids + self.config.learned_position_offset)
            if self.embed_proj is not None:
                h = self.embed_proj(h)
        mask = attention_bias(attention_mask, seq, h.dtype, self.config.sliding_window)
        rope = self.rope(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, rope, mask, past_key_values)
        h = self.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if self.head_proj is not None:
            h = self.head_proj(h)
        logits = self.lm_head(h)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: past_key_values})


# Parameter counts live with the rest of the size model (toolchain/model/sizes); kept importable here.
from toolchain.model.sizes import ParameterReport, count_parameters  # noqa: E402,F401


AutoConfig.register(SlicedConfig.model_type, SlicedConfig)
AutoModelForCausalLM.register(SlicedConfig, SlicedForCausalLM)
