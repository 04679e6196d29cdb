"""The fast ONNX Runtime graph: the canonical model emitted directly as ORT's fused contrib ops.

Why emit instead of pattern-matching the traced graph: ORT's transformer optimizer only recognises
the attention subgraphs of the HF architectures it was written for, so on our traced graphs it fuses
the norms and nothing else. The canonical model is small enough (gpt-fast style) that writing its
fused form straight from the weights is shorter and more predictable than rewriting a traced graph,
and it is the same route onnxruntime-genai's model builder takes. What each block becomes:

  norm          SimplifiedLayerNormalization (first) / SkipSimplifiedLayerNormalization (the others),
                with the exact rewrite of the weightless RMSNorm: eps·D/d and weight √(D/d) at width d
                (toolchain/model.py ResidualNorm). The skip input is the carried residual, so the
                residual add, the o/down-projection bias and the norm are one kernel; a shortcut
                (Q_pᵀQ_p+1) is one MatMul feeding that skip input.
  attention     one packed QKV MatMul → Split → RotaryEmbedding on q and k (com.microsoft, driven by
                position_ids) → GroupQueryAttention (KV cache concat, causal mask and softmax inside,
                padding through its attention_bias input) → o MatMul.
  MLP           one packed gate|up MatMul → Split → QuickGelu(α=1) = SiLU (or Gelu/FastGelu/Relu) ·
                up → down MatMul.
  head          SkipSimplifiedLayerNormalization → head_proj / lm_head MatMul (the tied table is
                also stored transposed, so int4 quantization reaches the head).

fp32 or fp16 (`build_fast_graph(dtype=)`): in fp16 every tensor but the logits is fp16, and the export
keeps it only after the fp16 parity check against the fp32 torch model.

The I/O contract is the traced graph's (optimum/genai names, concatenating KV cache, left padding
and batch > 1 supported): seqlens_k is total−1 for every row and the padding lives in the additive
attention bias, so GroupQueryAttention computes exactly the canonical model's masked attention.

MoDeGPT's reduced heads: a rotary dim below the head dim is RotaryEmbedding's rotary_embedding_dim,
and per-KV-head RoPE pairs (rope_pair_index) are rotated exactly by giving every (token, KV group)
its own cos/sin row (exporters/ort_rope.py).

Models the contrib ops cannot express fall back to the traced graph (`unsupported_reason`): layers
with q/k head dim ≠ v head dim or a head dim that is not a multiple of 8 (GroupQueryAttention takes
one head size, and its kernels multiples of 8; MoDeGPT with --modegpt-multiple 1 can leave both);
sliding windows; activations ORT has no fused kernel for.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters import ort_rope
from toolchain.model.modeling import SlicedForCausalLM, rope_inverse_frequencies

from toolchain.core.iospec import (ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, input_names, io_shapes,
                                   kv_head_dims, output_names, past_name, present_name)

MS = "com.microsoft"
# hidden_act → (op, domain, attributes); SiLU is QuickGelu with alpha 1: x·sigmoid(1·x)
ACTIVATIONS = {
    "silu": ("QuickGelu", MS, {"alpha": 1.0}),
    "swish": ("QuickGelu", MS, {"alpha": 1.0}),
    "gelu": ("Gelu", MS, {}),
    "gelu_new": ("FastGelu", MS, {}),
    "gelu_fast": ("FastGelu", MS, {}),
    "gelu_pytorch_tanh": ("FastGelu", MS, {}),
    "relu": ("Relu", "", {}),
}
FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
# The additive padding bias. fp16: half of fp16's lowest value, so bias + score cannot overflow to
# -inf (a row of only padded keys, as at a left-padded query, would then softmax to NaN).
MASK_MIN = {"fp32": float(np.finfo(np.float32).min), "fp16": float(np.finfo(np.float16).min) / 2}
FUSED_OPS = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def unsupported_reason(config) -> str | None:
    """Why the fast graph cannot express this model exactly (None: it can)."""
    if config.hidden_act not in ACTIVATIONS:
        return f"activation {config.hidden_act!r} has no fused ORT kernel here (supported: {', '.join(ACTIVATIONS)})"
    if config.num_attention_heads % config.num_key_value_heads:
        return "num_attention_heads is not a multiple of num_key_value_heads"
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        return f"sliding-window attention (window {config.sliding_window}) is kept in the traced graph's mask"
    for layer, (qk, v) in enumerate(kv_head_dims(config)):
        if qk != v:
            return (f"layer {layer} has q/k head dim {qk} ≠ v head dim {v} (MoDeGPT); GroupQueryAttention "
                    "needs one head size")
        if qk % 8:
            return f"layer {layer} has head dim {qk}; GroupQueryAttention needs a multiple of 8"
        if config.position_embedding == "rope":
            if config.qk_rotary_dim(layer) > qk or config.qk_rotary_dim(layer) % 2:
                return f"layer {layer}: rotary dim {config.qk_rotary_dim(layer)} does not fit head dim {qk}"
    return None


def expected_counts(config) -> dict[str, int]:
    """Fused op counts the fast graph of `config` has (tests and the export report check them)."""
    norms = config.num_hidden_layers * (1 if config.parallel_block else 2) + 1
    return {"GroupQueryAttention": config.num_hidden_layers, "SimplifiedLayerNormalization": 1,
            "SkipSimplifiedLayerNormalization": norms - 1}


class _Builder:
    """Nodes and initializers in emission order; every node gets a unique name and, for weight
    MatMuls, the torch module it comes from (quantize.py keeps residual readers at 8 bits by it).
    Every floating constant is stored in the graph's float type (`float_type`)."""

    def __init__(self, float_type=np.float32):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: Counter = Counter()
        self.float_type = np.dtype(float_type)

    def unique(self, base: str) -> str:
        self._names[base] += 1
        return base if self._names[base] == 1 else f"{base}_{self._names[base] - 1}"

    def const(self, name: str, value) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.is_floating_point() else value  # numpy has no bfloat16
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(self.float_type)
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, name: str | None = None,
           domain: str = "", module: str | None = None, **attrs) -> list[str]:
        name = self.unique(name or op_type)
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        node = helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs)
        if module is not None:
            helper.set_metadata_props(node, {"namespace": f"model.{module}"})
        self.nodes.append(node)
        return outputs

    def linear(self, x: str, layer: torch.nn.Linear | list[torch.nn.Linear], module: str,
               bias: bool = True) -> str:
        """x·Wᵀ (+ b); several Linears reading the same x are packed into one MatMul."""
        layers = layer if isinstance(layer, list) else [layer]
        weight = torch.cat([lin.weight for lin in layers], dim=0).t()
        out = self.op("MatMul", [x, self.const(f"{module}.weight", weight)], name=f"{module}/MatMul", module=module)[0]
        if bias and layers[0].bias is not None:
            b = torch.cat([lin.bias for lin in layers])
            out = self.op("Add", [out, self.const(f"{module}.bias", b)], name=f"{module}/Add")[0]
        return out


def _value(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def build_fast_graph(model: SlicedForCausalLM, opset: int = 20, dtype: str = "fp32") -> onnx.ModelProto:
    """The fused graph of `model` in `dtype` (weights inline; the caller decides on external data).

    fp16: weights, activations and the KV cache are fp16, logits fp32. The first norm accumulates in
    fp32 (stash_type 1); SkipSimplifiedLayerNormalization and GroupQueryAttention have no such
    attribute, but their fp16 kernels widen to fp32 for the mean of squares and for QKᵀ, softmax and
    PV (ORT's CPU kernels convert each row or head to fp32; the CUDA ones accumulate in fp32). RoPE
    angles are computed here in fp32 (position × frequency needs more than fp16's 11 bits), only the
    cos/sin values are stored in fp16.
    """
    config = model.config
    if dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype {dtype!r}: the fast graph is emitted in {' or '.join(FLOAT_TYPES)}")
    if (reason := unsupported_reason(config)) is not None:
        raise ValueError(f"the fast ORT graph cannot express this model: {reason}")
    with torch.no_grad():
        return _build(model.eval(), config, opset, dtype)


def _build(model: SlicedForCausalLM, config, opset: int, dtype: str) -> onnx.ModelProto:
    b = _Builder(FLOAT_TYPES[dtype][0])
    elem = FLOAT_TYPES[dtype][1]
    layers = config.num_hidden_layers
    ids, mask, positions = INPUT_IDS, ATTENTION_MASK, POSITION_IDS

    # --- per-step attention bookkeeping, shared by every layer ----------------------------------
    total = b.op("Gather", [b.op("Shape", [mask], name="mask_shape")[0], b.const("one_i64", np.array(1, np.int64))],
                 name="total_len", axis=0)[0]
    total32 = b.op("Cast", [total], name="total_len_i32", to=TensorProto.INT32)[0]
    batch = b.op("Shape", [ids], name="batch", start=0, end=1)[0]
    last = b.op("Sub", [total32, b.const("one_i32", np.array(1, np.int32))], name="last_index")[0]
    # every row sees the whole (past + new) window; padding is masked by the bias below
    seqlens_k = b.op("Expand", [last, batch], name="seqlens_k")[0]
    keep = b.op("Cast", [mask], name="mask_bool", to=TensorProto.BOOL)[0]
    bias2d = b.op("Where", [keep, b.const("zero_f32", np.array(0.0)), b.const("mask_min", np.array(MASK_MIN[dtype]))],
                  name="mask_bias")[0]
    bias4d = b.op("Unsqueeze", [bias2d, b.const("bias_axes", np.array([1, 2], np.int64))], name="mask_bias_4d")[0]
    # GroupQueryAttention wants the bias as (batch, 1, sequence, total): no broadcasting over queries
    bias_shape = b.op("Concat", [batch, b.const("one_i64_1d", np.array([1], np.int64)),
                                 b.op("Shape", [ids], name="seq_len", start=1, end=2)[0],
                                 b.op("Shape", [mask], name="total_len_1d", start=1, end=2)[0]],
                      name="bias_shape", axis=0)[0]
    attn_bias = b.op("Expand", [bias4d, bias_shape], name="attention_bias")[0]
    rope_caches = ["", ""]
    if config.position_embedding == "rope":
        inv_freq, scaling = rope_inverse_frequencies(config)
        angles = torch.arange(config.max_position_embeddings)[:, None].float() * inv_freq.float()[None]
        rope_caches = [b.const("cos_cache", angles.cos() * scaling), b.const("sin_cache", angles.sin() * scaling)]
    kept_pair_rows = None
    if any(pairs is not None for pairs in config.rope_pair_index) and config.position_embedding == "rope":
        kept_pair_rows = ort_rope.step_rows(b, rope_caches, positions, config.num_key_value_heads)

    # --- embeddings ------------------------------------------------------------------------------
    h = b.op("Gather", [b.const("embed_tokens.weight", model.embed_tokens.weight), ids], name="embed_tokens")[0]
    if model.embed_positions is not None:
        shifted = b.op("Add", [positions, b.const("position_offset", np.array(config.learned_position_offset, np.int64))])[0]
        pos = b.op("Gather", [b.const("embed_positions.weight", model.embed_positions.weight), shifted],
                   name="embed_positions")[0]
        h = b.op("Add", [h, pos], name="embed_sum")[0]
    if model.embed_proj is not None:
        h = b.linear(h, model.embed_proj, "embed_proj")

    # The residual stream is kept as "pending": (block output, carried residual, bias) not yet added,
    # so the add happens inside the next SkipSimplifiedLayerNormalization.
    pending: tuple[str, str, np.ndarray | None] | str = h

    def norm(norm_module, name: str) -> tuple[str, str]:
        """(normed x, residual sum) of the pending residual through `norm_module`."""
        nonlocal pending
        gamma = b.const(f"{name}.weight", norm_module.weight.float())
        if isinstance(pending, str):
            x = b.op("SimplifiedLayerNormalization", [pending, gamma], name=name, axis=-1,
                     epsilon=float(norm_module.eps), stash_type=1)[0]
            return x, pending
        out, carried, bias = pending
        inputs = [out, carried, gamma] + ([b.const(f"{name}.bias", bias)] if bias is not None else [])
        x, _, _, total_sum = b.op("SkipSimplifiedLayerNormalization", inputs,
                                  outputs=[f"{name}/out", "", "", f"{name}/residual"], name=name, domain=MS,
                                  epsilon=float(norm_module.eps))
        return x, total_sum

    def carry(shortcut, residual: str, module: str) -> str:
        return residual if shortcut is None else b.linear(residual, shortcut, module)

    def attention(attn, x: str, layer: int) -> str:
        prefix = f"layers.{layer}.attn"
        qkv = b.linear(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{prefix}.qkv_proj")
        q_width, kv_width = attn.heads * attn.qk_dim, attn.kv_heads * attn.qk_dim
        sizes = b.const(f"{prefix}.qkv_split", np.array([q_width, kv_width, attn.kv_heads * attn.v_dim], np.int64))
        q, k, v = b.op("Split", [qkv, sizes], 3, name=f"{prefix}/Split", axis=-1)
        if config.position_embedding == "rope" and config.rope_pair_index[layer] is not None:
            q, k = ort_rope.rotate(b, q, k, kept_pair_rows, config.rope_pair_index[layer], config.rotary_dim // 2,
                                   attn.heads, attn.kv_heads, attn.qk_dim, prefix)
        elif config.position_embedding == "rope":
            # RotaryEmbedding, not GroupQueryAttention's do_rotary: GQA rotates a first prompt by token
            # index and ignores position_ids, which is wrong for left-padded rows
            rot = config.qk_rotary_dim(layer)
            q, k = (b.op("RotaryEmbedding", [t, positions, *rope_caches], name=f"{prefix}/rotary_{kind}", domain=MS,
                         num_heads=heads, rotary_embedding_dim=rot, interleaved=0)[0]
                    for t, kind, heads in ((q, "q", attn.heads), (k, "k", attn.kv_heads)))
        past = [past_name(layer, "key"), past_name(layer, "value")]
        present = [present_name(layer, "key"), present_name(layer, "value")]
        out = b.op("GroupQueryAttention", [q, k, v, *past, seqlens_k, total32, "", "", "", attn_bias],
                   outputs=[f"{prefix}/GroupQueryAttention/out", *present], name=f"{prefix}/GroupQueryAttention",
                   domain=MS, num_heads=attn.heads, kv_num_heads=attn.kv_heads, scale=float(attn.scale))[0]
        return b.linear(out, attn.o_proj, f"{prefix}.o_proj", bias=False)

    def mlp(block, x: str, layer: int) -> str:
        prefix = f"layers.{layer}.mlp"
        op_type, domain, attrs = ACTIVATIONS[config.hidden_act]
        if block.gate_proj is not None:
            inner = block.up_proj.out_features
            packed = b.linear(x, [block.gate_proj, block.up_proj], f"{prefix}.gate_up_proj")
            gate, up = b.op("Split", [packed, b.const(f"{prefix}.split", np.array([inner, inner], np.int64))], 2,
                            name=f"{prefix}/Split", axis=-1)
            hidden = b.op("Mul", [b.op(op_type, [gate], name=f"{prefix}/act", domain=domain, **attrs)[0], up],
                          name=f"{prefix}/Mul")[0]
        else:
            hidden = b.op(op_type, [b.linear(x, block.up_proj, f"{prefix}.up_proj")], name=f"{prefix}/act",
                          domain=domain, **attrs)[0]
        return b.linear(hidden, block.down_proj, f"{prefix}.down_proj", bias=False)

    def bias_of(*linears) -> np.ndarray | None:
        biases = [lin.bias for lin in linears if lin.bias is not None]
        return None if not biases else sum(t.float() for t in biases).numpy()

    for layer, block in enumerate(model.layers):
        x, residual = norm(block.attn_norm, f"layers.{layer}.attn_norm")
        attn_out = attention(block.attn, x, layer)
        carried = carry(block.attn_shortcut, residual, f"layers.{layer}.attn_shortcut")
        if block.parallel:
            both = b.op("Add", [attn_out, mlp(block.mlp, x, layer)], name=f"layers.{layer}/parallel_sum")[0]
            pending = (both, carried, bias_of(block.attn.o_proj, block.mlp.down_proj))
            continue
        pending = (attn_out, carried, bias_of(block.attn.o_proj))
        x, residual = norm(block.mlp_norm, f"layers.{layer}.mlp_norm")
        carried = carry(block.mlp_shortcut, residual, f"layers.{layer}.mlp_shortcut")
        pending = (mlp(block.mlp, x, layer), carried, bias_of(block.mlp.down_proj))

    h, _ = norm(model.norm, "norm")
    if model.head_proj is not None:
        h = b.linear(h, model.head_proj, "head_proj")
    logits = b.linear(h, model.lm_head, "lm_head")
    if elem == TensorProto.FLOAT:
        b.op("Identity", [logits], outputs=[LOGITS], name="logits")
    else:  # logits leave in fp32, as the traced fp16 graph's do
        b.op("Cast", [logits], outputs=[LOGITS], name="logits", to=TensorProto.FLOAT)

    # --- I/O -------------------------------------------------------------------------------------
    names_in, names_out = input_names(layers), output_names(layers)
    dims = kv_head_dims(config)
    in_shapes, out_shapes = io_shapes(config.num_key_value_heads, [k for k, _ in dims], [v for _, v in dims],
                                      config.vocab_size)
    inputs = [_value(n, TensorProto.INT64 if n in (ids, mask, positions) else elem, shape)
              for n, shape in in_shapes.items()]
    outputs = [_value(n, TensorProto.FLOAT if n == LOGITS else elem, shape) for n, shape in out_shapes.items()]
    assert [i.name for i in inputs] == names_in and [o.name for o in outputs] == names_out
    graph = helper.make_graph(b.nodes, "toolchain_fast", inputs, outputs, b.initializers)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                    producer_name="toolchain.exporters.ort_fusion")
    model_proto.ir_version = 10
    return model_proto
