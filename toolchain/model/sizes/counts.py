"""Parameters, weight bytes, KV-cache bytes and FLOPs of a `Decoder`, from its shapes alone.

Every weight is listed once as a `Tensor`: a constant times the residual widths it spans, so the same
list gives exact counts for known widths and the quadratic size model a width budget needs
(toolchain/compress/budget.py). A tied head is the token table: listed once, under embeddings, as
`count_parameters` and the compression report have always counted it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toolchain.core.errors import InvalidOptionError
from toolchain.model.sizes.decoder import Decoder, describe

GROUPS = ("embeddings", "blocks", "shortcuts", "lm_head")


@dataclass(frozen=True)
class Tensor:
    """numel = const × Π residual_widths[p] for p in `widths`."""

    name: str
    group: str  # embeddings | blocks | shortcuts | lm_head
    kind: str  # table (lookup) | linear (a matmul weight) | bias | norm
    const: int
    widths: tuple[int, ...] = ()

    def numel(self, widths) -> int:
        return self.const * math.prod(widths[p] for p in self.widths)


def _linear(name, group, rows, cols, bias: bool) -> list[Tensor]:
    """An nn.Linear reading `cols` and writing `rows`; each side a constant or ("w", p)."""
    const, where = 1, []
    for side in (rows, cols):
        if isinstance(side, tuple):
            where.append(side[1])
        else:
            const *= side
    out = [Tensor(f"{name}.weight", group, "linear", const, tuple(where))]
    if bias:
        out.append(Tensor(f"{name}.bias", group, "bias", rows if not isinstance(rows, tuple) else 1,
                          (rows[1],) if isinstance(rows, tuple) else ()))
    return out


def tensors(d: Decoder) -> list[Tensor]:
    """Every weight of `d`, in module order (embeddings, layers, head)."""
    w = lambda p: ("w", p)  # noqa: E731  the width of residual position p
    final = d.positions
    table = d.table_width if d.embed_proj and d.table_width else w(0)
    out = [_table("embed_tokens.weight", d.vocab_size, table)]
    if d.position_rows:
        out.append(_table("embed_positions.weight", d.position_rows, d.position_width or table))
    if d.embed_proj:
        out += _linear("embed_proj", "embeddings" if d.fused else "blocks", w(0), d.table_width, False)
    norm = lambda name: [Tensor(name, "blocks", "norm", d.norm_params)] if d.norm_params else []  # noqa: E731
    for layer in range(d.num_layers):
        pre = f"layers.{layer}"
        attn_in, mlp_in = d.layer_positions(layer)
        qk, v, inner = d.qk_head_dims[layer], d.v_head_dims[layer], d.intermediate_sizes[layer]
        out += norm(f"{pre}.attn_norm")
        for proj, rows in (("q", d.num_heads * qk), ("k", d.num_kv_heads * qk), ("v", d.num_kv_heads * v)):
            out += _linear(f"{pre}.attn.{proj}_proj", "blocks", rows, w(attn_in), d.qkv_bias)
        out += _linear(f"{pre}.attn.o_proj", "blocks", w(attn_in + 1), d.num_heads * v, d.o_bias)
        if d.qk_norm_params:
            out.append(Tensor(f"{pre}.attn.qk_norm", "blocks", "norm", d.qk_norm_params))
        if d.shortcuts[attn_in]:
            out += _linear(f"{pre}.attn_shortcut", "shortcuts", w(attn_in + 1), w(attn_in), False)
        if not d.parallel_block:
            out += norm(f"{pre}.mlp_norm")
        for proj in ("up", "gate") if d.gated_mlp else ("up",):
            out += _linear(f"{pre}.mlp.{proj}_proj", "blocks", inner, w(mlp_in), d.mlp_up_bias)
        out += _linear(f"{pre}.mlp.down_proj", "blocks", w(mlp_in + 1), inner, d.mlp_down_bias)
        if not d.parallel_block and d.shortcuts[mlp_in]:
            out += _linear(f"{pre}.mlp_shortcut", "shortcuts", w(mlp_in + 1), w(mlp_in), False)
    out += norm("norm")
    head_in = w(final)
    if d.head_proj:  # a tied head reads the table's width; head_proj maps the final residual to it
        head_in = table if d.tied else w(final)
        out += _linear("head_proj", "lm_head" if d.fused else "blocks", head_in, w(final), False)
    if not d.tied:
        out += _linear("lm_head", "lm_head", d.vocab_size, head_in, d.lm_head_bias)
    elif d.lm_head_bias:
        out.append(Tensor("lm_head.bias", "lm_head", "bias", d.vocab_size))
    return out


def _table(name: str, rows: int, width) -> Tensor:
    if isinstance(width, tuple):
        return Tensor(name, "embeddings", "table", rows, (width[1],))
    return Tensor(name, "embeddings", "table", rows * width)


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts with shortcuts, embeddings and head included; a tied head is counted once.
    The keys of the compression report and of the CLI's parameter table."""

    total: int
    embeddings: int
    lm_head: int
    shortcuts: int
    blocks: int
    tied: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Parameters:
    """ParameterReport's groups plus what costs derive from: `tables` (token and position tables),
    `lookup` (tables a forward only indexes: a tied token table is read whole as the head),
    `matmul` (Linear weights, the head included: 2 FLOPs each per token) and `head` (the head's share)."""

    report: ParameterReport
    tables: int
    lookup: int
    matmul: int
    head: int

    @property
    def total(self) -> int:
        return self.report.total

    def as_dict(self) -> dict:
        return self.report.as_dict() | {"tables": self.tables, "lookup": self.lookup, "matmul": self.matmul,
                                        "head_matmul": self.head}


def parameters(d: Decoder) -> Parameters:
    widths = d.residual_widths
    groups = dict.fromkeys(GROUPS, 0)
    tables = matmul = head = 0
    for t in tensors(d):
        n = t.numel(widths)
        groups[t.group] += n
        tables += n if t.kind == "table" else 0
        if t.kind == "linear":
            matmul += n
            head += n if t.name.startswith(("lm_head", "head_proj")) else 0
    if d.tied:  # the head's matmul is the token table
        table = d.vocab_size * (d.embedding_width if d.head_proj else widths[-1])
        matmul, head = matmul + table, head + table
        lookup = tables - table
    else:
        lookup = tables
    report = ParameterReport(total=sum(groups.values()), tied=d.tied, **groups)
    return Parameters(report, tables, lookup, matmul, head)


def size_terms(d: Decoder) -> tuple[int, list[int], list[tuple[int, int]]]:
    """total(widths) = const + Σ_p linear[p]·d_p + Σ_(i,j) d_i·d_j, from the tensor list: the size
    model of a width budget, with shortcuts, tables and head projections included."""
    const, linear, pairs = 0, [0] * (d.positions + 1), []
    for t in tensors(d):
        if not t.widths:
            const += t.const
        elif len(t.widths) == 1:
            linear[t.widths[0]] += t.const
        else:
            pairs += [tuple(t.widths)] * t.const
    return const, linear, pairs


def block_parameters(d: Decoder, layer: int) -> int:
    """Attention + MLP parameters of one layer (weights and biases; no norms, no shortcuts)."""
    prefix = (f"layers.{layer}.attn.", f"layers.{layer}.mlp.")
    return sum(t.numel(d.residual_widths) for t in tensors(d)
               if t.name.startswith(prefix) and t.kind in ("linear", "bias"))


# ---- bytes and FLOPs ----

WEIGHT_BYTES = {"fp64": 8.0, "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
_DTYPE_ALIASES = {"float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "float16": "fp16",
                  "half": "fp16", "bfloat16": "bf16", "q8": "int8", "q4": "int4"}


def normalise_dtype(dtype) -> str:
    """fp32 | fp16 | bf16 | int8 | int4 (| fp64) from a name, an alias or a torch.dtype."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in WEIGHT_BYTES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose one of "
                                 f"{', '.join(k for k in WEIGHT_BYTES if k != 'fp64')}")
    return key


def weight_bytes(params: int, dtype) -> int:
    """Bytes of `params` weights at `dtype` (int4: half a byte, rounded up; scales not counted)."""
    return math.ceil(params * WEIGHT_BYTES[normalise_dtype(dtype)])


def activation_bytes(dtype) -> int:
    """Bytes per activation / KV element: int8/int4 are weight-only formats, so 16-bit activations."""
    key = normalise_dtype(dtype)
    return {"fp64": 8, "fp32": 4}.get(key, 2)


def kv_elements_per_token(d: Decoder) -> int:
    """Keys and values cached per token and sequence: G·Σ_layers (qk + v) head dims. Slicing the
    residual stream leaves it as is; MoDeGPT's per-layer head dims shrink it."""
    return d.num_kv_heads * sum(q + v for q, v in zip(d.qk_head_dims, d.v_head_dims))


def kv_cache_bytes(d: Decoder, batch: int, tokens: int, dtype) -> int:
    return batch * tokens * kv_elements_per_token(d) * activation_bytes(dtype)


def attention_macs(d: Decoder) -> list[int]:
    """Per layer, multiply-adds per (query, key) pair: every query head scores qk dims and mixes v dims."""
    return [d.num_heads * (q + v) for q, v in zip(d.qk_head_dims, d.v_head_dims)]


def flops_per_token(d: Decoder, head: bool = True) -> int:
    """Matmul FLOPs of one token without attention over the cache (2 per weight of every Linear)."""
    p = parameters(d)
    return 2 * (p.matmul if head else p.matmul - p.head)


def count_parameters(model) -> ParameterReport:
    """ParameterReport of a torch model (canonical or HF) from its config."""
    return parameters(describe(model.config)).report
