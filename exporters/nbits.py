"""Write block-quantized weights (toolchain.core.blockquant.BlockQuantized) into an ONNX graph.

  MatMulNBits (com.microsoft)          x·W with W [N, K] stored as B uint8 [N, n_blocks, blob]: each
                                       block's codes packed along K (two per byte at 4 bits, low nibble
                                       first), K padded with zero codes up to whole blocks; scales
                                       [N, n_blocks]; zero points [N, ⌈n_blocks·bits/8⌉] (two blocks a
                                       byte at 4 bits).
  GatherBlockQuantized (com.microsoft)  the token table's rows, from the same packed layout viewed as
                                       [V, padded_d·bits/8] (gather_axis 0, quantize_axis 1), so a tied
                                       head's MatMulNBits and the lookup read one int4 table.

Names follow onnxruntime's MatMulNBitsQuantizer ("{weight}_Q{bits}", "_scales", "_zero_points",
node "{matmul}_Q{bits}"), so round-to-nearest codes written here give the graph that quantizer writes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from toolchain.core.blockquant import BlockQuantized

MS = "com.microsoft"


def pack_weight(q: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B uint8 [N, n_blocks, blob], scales float32 [N, n_blocks], zero points uint8 packed) as
    MatMulNBits stores them."""
    check(q)
    n = q.codes.shape[0]
    # the last block's padding is code 0, as onnxruntime's quantizer leaves it: K is exact, so the
    # kernels never read it (and the bytes equal that quantizer's)
    blocks = -(-q.codes.shape[1] // q.block_size)
    padded = np.zeros((n, blocks * q.block_size), np.uint8)
    padded[:, :q.codes.shape[1]] = q.codes
    packed = _pack(padded, q.bits).reshape(n, blocks, -1)
    return packed, q.scales.astype(np.float32), pack_zero_points(q.zero_points, q.bits)


def check(q: BlockQuantized) -> None:
    n, k = q.codes.shape
    blocks = -(-k // q.block_size)
    if q.bits not in (4, 8):
        raise ValueError(f"MatMulNBits blocks are written at 4 or 8 bits here, got {q.bits}")
    if q.codes.dtype != np.uint8 or q.zero_points.dtype != np.uint8:
        raise ValueError("codes and zero points must be uint8")
    if q.scales.shape != (n, blocks) or q.zero_points.shape != (n, blocks):
        raise ValueError(f"scales and zero points must be [{n}, {blocks}], got {q.scales.shape} and {q.zero_points.shape}")


def concat_n(parts: list[BlockQuantized]) -> BlockQuantized:
    """Weights that read one input (q, k, v; gate, up) stacked along N: one packed MatMul's weight."""
    first = parts[0]
    if any(p.block_size != first.block_size or p.bits != first.bits or p.codes.shape[1] != first.codes.shape[1]
           for p in parts):
        raise ValueError("weights packed into one MatMul need the same K, block size and bits")
    return BlockQuantized(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zero_points")),
                          first.block_size, first.bits)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    n, blocks = zero_points.shape
    if bits == 8:
        return zero_points.astype(np.uint8)
    # an odd block count leaves a spare nibble: onnxruntime fills it with the default zero point 8
    padded = np.full((n, blocks + blocks % 2), 1 << (bits - 1), np.uint8)
    padded[:, :blocks] = zero_points
    return _pack(padded, bits)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values [rows, cols] (cols even at 4 bits) along cols, low nibble first."""
    if bits == 8:
        return values.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"only 4- and 8-bit blocks are written, got {bits}")
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def weight_initializers(q: BlockQuantized, weight_name: str) -> list[onnx.TensorProto]:
    """The MatMulNBits inputs 1..3 for the weight initializer `weight_name`."""
    packed, scales, zeros = pack_weight(q)
    return [numpy_helper.from_array(packed, f"{weight_name}_Q{q.bits}"),
            numpy_helper.from_array(scales, f"{weight_name}_scales"),
            numpy_helper.from_array(zeros, f"{weight_name}_zero_points")]


def matmul_nbits_node(node: onnx.NodeProto, q: BlockQuantized, weight_name: str,
                      accuracy_level: int | None) -> onnx.NodeProto:
    """The MatMulNBits replacing MatMul `node` (x·B, B = the initializer `weight_name` = Wᵀ)."""
    n, k = q.codes.shape
    attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:  # 0 is the default and the attribute is optional (other EPs reject it)
        attrs["accuracy_level"] = accuracy_level
    inputs = [node.input[0], f"{weight_name}_Q{q.bits}", f"{weight_name}_scales", f"{weight_name}_zero_points"]
    out = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{q.bits}", domain=MS, **attrs)
    out.metadata_props.extend(node.metadata_props)  # keeps the module name for later passes and reports
    return out


def replace_matmuls(model: onnx.ModelProto, weights: dict[str, BlockQuantized], accuracy_level: int | None) -> int:
    """Replace every MatMul whose B initializer is a key of `weights` ({initializer name: W [N, K]
    quantized, W = Bᵀ}) by MatMulNBits; drop fp32 initializers nothing reads any more. Returns the count."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    added: set[str] = set()
    replaced = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in weights:
            continue
        name = node.input[1]
        q = weights[name]
        k, n = inits[name].dims
        if q.codes.shape != (n, k):
            raise ValueError(f"{name}: quantized weight is {q.codes.shape}, the MatMul needs [N={n}, K={k}]")
        if name not in added:  # one set of initializers per weight, however many MatMuls read it
            graph.initializer.extend(weight_initializers(q, name))
            added.add(name)
        graph.node[index].CopyFrom(matmul_nbits_node(node, q, name, accuracy_level))
        replaced += 1
    drop_unused_initializers(model)
    return replaced


def gather_block_quantized(model: onnx.ModelProto, gather: onnx.NodeProto, q: BlockQuantized, weight_name: str,
                           ensure_initializers: bool) -> None:
    """Replace Gather(table, ids) by GatherBlockQuantized over `weight_name`'s MatMulNBits layout
    (q: the table [V, d] quantized along d). With ensure_initializers the packed table is added
    (the lookup has it to itself); else it must already be there (shared with a MatMulNBits)."""
    graph = model.graph
    vocab, width = q.codes.shape
    if ensure_initializers:
        graph.initializer.extend(weight_initializers(q, weight_name))
    blocks = -(-width // q.block_size)
    flat = blocks * q.block_size * q.bits // 8
    shape = f"{weight_name}_Q{q.bits}_rows_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, flat], np.int64), shape))
    rows = f"{weight_name}_Q{q.bits}_rows"
    nodes = [helper.make_node("Reshape", [f"{weight_name}_Q{q.bits}", shape], [rows], name=f"{gather.name}/Reshape")]
    padded = blocks * q.block_size != width
    lookup_out = f"{gather.name}/GatherBlockQuantized/out" if padded else gather.output[0]
    nodes.append(helper.make_node("GatherBlockQuantized", [rows, gather.input[1], f"{weight_name}_scales",
                                                           f"{weight_name}_zero_points"],
                                  [lookup_out], name=f"{gather.name}/GatherBlockQuantized", domain=MS,
                                  bits=q.bits, block_size=q.block_size, gather_axis=0, quantize_axis=1))
    if padded:  # the rows carry the zero padding of the last block; cut back to d
        ends = f"{gather.name}/slice_ends"
        graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{gather.name}/slice_starts"),
                                  numpy_helper.from_array(np.array([width], np.int64), ends),
                                  numpy_helper.from_array(np.array([-1], np.int64), f"{gather.name}/slice_axes")])
        nodes.append(helper.make_node("Slice", [lookup_out, f"{gather.name}/slice_starts", ends, f"{gather.name}/slice_axes"],
                                      [gather.output[0]], name=f"{gather.name}/Slice"))
    index = list(graph.node).index(gather)
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
