"""Zero-padding of per-layer KV head dims for onnxruntime-genai.

genai allocates ONE shape (batch, num_key_value_heads, length, head_size) for every past and present
tensor of every layer. MoDeGPT makes key/value head dims differ per layer (and key ≠ value), so for such
graphs we write a copy whose KV inputs/outputs are padded to the largest head dim: a Slice after each
past input, a Pad before each present output. Exact: the padded columns are never read.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from toolchain.core.errors import ArtifactError
from toolchain.core.fileio import atomic_file
from toolchain.core.iospec import KV_KINDS, PAST_PREFIX, PRESENT_PREFIX, is_kv_name, past_kv_shapes, past_name


def pad_kv_io(src: str | Path, dst: str | Path, head_size: int) -> list[str]:
    """Write a copy of the graph at `src` whose past/present KV tensors all have last dim `head_size`.

    Each narrower past input gets a Slice back to its own dim before the graph reads it; each narrower
    present output is produced by a zero Pad of the graph's own present. Weights are not loaded: an
    external-data graph written beside `src` keeps pointing at the same .data file. Returns the
    names of the tensors that were padded.
    """
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    changed, heads, tails, inits = [], [], [], []

    def rename_uses(old: str, new: str, outputs: bool) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            if outputs:
                for i, name in enumerate(node.output):
                    if name == old:
                        node.output[i] = new
        for info in graph.value_info:
            if info.name == old:
                info.name = new

    for value in graph.input:
        dim = _kv_last_dim(value, PAST_PREFIX)
        if dim is None or dim == head_size:
            continue
        inner = f"{value.name}/unpadded"
        rename_uses(value.name, inner, outputs=False)
        ends = f"{value.name}/ends"
        inits += [numpy_helper.from_array(_i64([0]), f"{value.name}/starts"), numpy_helper.from_array(_i64([dim]), ends),
                  numpy_helper.from_array(_i64([3]), f"{value.name}/axes")]
        heads.append(helper.make_node("Slice", [value.name, f"{value.name}/starts", ends, f"{value.name}/axes"],
                                      [inner], name=f"{value.name}/genai_slice"))
        value.type.tensor_type.shape.dim[3].dim_value = head_size
        changed.append(value.name)
    for value in graph.output:
        dim = _kv_last_dim(value, PRESENT_PREFIX)
        if dim is None or dim == head_size:
            continue
        inner = f"{value.name}/unpadded"
        rename_uses(value.name, inner, outputs=True)
        pads = f"{value.name}/pads"
        inits.append(numpy_helper.from_array(_i64([0, 0, 0, 0, 0, 0, 0, head_size - dim]), pads))
        tails.append(helper.make_node("Pad", [inner, pads], [value.name], mode="constant",
                                      name=f"{value.name}/genai_pad"))
        value.type.tensor_type.shape.dim[3].dim_value = head_size
        changed.append(value.name)
    nodes = [*heads, *graph.node, *tails]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    with atomic_file(dst) as tmp:
        onnx.save_model(model, str(tmp))
    return changed


def _i64(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def _kv_last_dim(value, prefix: str) -> int | None:
    if not is_kv_name(value.name, prefix):
        return None
    dims = value.type.tensor_type.shape.dim
    return dims[3].dim_value if len(dims) == 4 and dims[3].dim_value else None


def kv_dims(graph: onnx.ModelProto) -> list[list[tuple[int, int]]]:
    """Per layer [(heads, key dim), (heads, value dim)] of the past inputs."""
    inputs = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.graph.input}
    layers = []
    for i, pair in enumerate(past_kv_shapes(inputs)):
        entry = []
        for kind, dims in zip(KV_KINDS, pair):
            if len(dims) != 4 or not dims[1] or not dims[3]:
                raise ArtifactError(f"{past_name(i, kind)} must be (batch, heads, past, head_dim) with static "
                                    f"heads and head_dim; the graph has {dims}")
            entry.append((dims[1], dims[3]))
        layers.append(entry)
    return layers
