"""Slice a checkpoint without ever holding it: bounded-memory SliceGPT (issue 6, item 5).

The in-memory path loads the HF model, converts it to the canonical model (a second full copy) and
slices that. Here the canonical model is a skeleton on the meta device; `StreamedWeights` (a
`slicegpt.WeightStore`) fills in one layer at a time, read from the checkpoint's safetensors
(`safe_open`, one shard mapped only while a tensor is copied out, sharded checkpoints through
model.safetensors.index.json), with that layer's norms folded (float64 one tensor at a time, then
back to the compute dtype). The slicing code itself is the one of `slicegpt.slice_model`: it opens a
layer where it starts working on it and closes it when its output rotation is done; closing hands the
sliced tensors to `ShardWriter` and puts the layer back on the meta device. What is resident at once:
the layer being sliced (the one before it too with `--share layer`, whose basis needs this layer's
attention first), the calibration activations (compute dtype, or files with `offload`), the D x D
bases, and at most one output shard waiting to be written. The V x D tables (embedding, untied head)
are read alone: the head after the last layer is closed and the pending shard written, and their
float64 work (norm folding, rotation) runs in row blocks (toolchain.model.blocks).

Every slicing option streams; none falls back to the in-memory path:
- options that need statistics of the dense model first (`--tie-basis joint` on a sliced tied table,
  `--share all`, spectrum budgets `--budget variance|global`) make one extra streaming pass over the
  dense layers (each layer is read twice);
- `--tie project` keeps the full token table, written once, plus a D x D `embed_proj`.
MoDeGPT (`--method modegpt`, `slicegpt+modegpt`) still runs in memory (see compressing.py).

The result equals the in-memory path's: the same conversion functions (adapters.base) and the same
slicing loop run on the same values in the same order, so on one device the saved tensors are
bit-identical (tests/test_streaming.py checks logits and bytes).

Output: shards of at most `shard_bytes` (a shard closes at a layer boundary once it is full), named as
save_pretrained names them — model.safetensors when one shard holds everything, else
model-0000k-of-0000n.safetensors + model.safetensors.index.json, which from_pretrained loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from toolchain.model.adapters.base import Adapter, TensorSource, embedding_state, head_state, layer_state
from toolchain.compress.slicegpt.weights import WeightStore
from toolchain.model.finite import require_finite_weight
from toolchain.model.modeling import SlicedForCausalLM

SHARD_BYTES = 256 * 2**20  # output shard size: bounds the sliced tensors waiting to be written
SAFE_METADATA = {"format": "pt"}  # what save_pretrained writes, so single-file outputs are identical


class SafetensorsCheckpoint(TensorSource):
    """A checkpoint dir's tensors by name, read on demand. A shard is opened (memory-mapped) only while
    one tensor is copied out of it, so no mapping outlives the read and pages of tensors already used
    do not stay in this process's resident set."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        from toolchain.data.sources import _safetensors_shards

        self.path = Path(path)
        self._shard: dict[str, Path] = {}
        for shard in _safetensors_shards(self.path):
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    self._shard[name] = shard
        self.names = frozenset(self._shard)
        self._alias: dict[str, str] = {}
        self.tensors_read = 0
        self.bytes_read = 0

    def expect(self, skeleton) -> None:
        """Match names to the HF model's: checkpoints saved from the base model (e.g. early OPT files)
        lack its prefix (`model.`), which from_pretrained adds back; do the same."""
        prefix = f"{skeleton.base_model_prefix}."
        for name, _ in skeleton.named_parameters(remove_duplicate=False):
            stripped = name.removeprefix(prefix)
            if name not in self._shard and stripped != name and stripped in self._shard:
                self._alias[name] = stripped
        self.names = frozenset(self._shard) | frozenset(self._alias)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self._alias.get(name, name)
        with safe_open(str(self._shard[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        require_finite_weight(name, tensor, "source weight")
        self.tensors_read += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class ShardWriter:
    """Collect output tensors and write them as safetensors shards of about `shard_bytes` each under
    hidden names in `directory`; `finish` gives them their final (save_pretrained) names."""

    def __init__(self, directory: str | os.PathLike, shard_bytes: int = SHARD_BYTES):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.max_pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one unit (a layer, the embedding, the head); a full shard is written at unit boundaries."""
        for name, tensor in tensors.items():
            if name in self.pending or any(name in names for _, names in self.shards):
                raise ValueError(f"tensor {name} written twice")
            tensor = tensor.detach().to("cpu")
            size = tensor.numel() * tensor.element_size()
            if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != size:
                tensor = tensor.contiguous().clone()  # own storage: safetensors refuses shared views
            self.pending[name] = tensor
            self.pending_bytes += tensor.numel() * tensor.element_size()
        self.max_pending_bytes = max(self.max_pending_bytes, self.pending_bytes)
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata=SAFE_METADATA)
        self.shards.append((path, sorted(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, rename the shards, write the index if there are several; the file names."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.shards[0][0], self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for number, (path, tensors) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names + ["model.safetensors.index.json"]


def _release(module: nn.Module) -> None:
    """Replace every parameter under `module` by a meta tensor of its shape (frees the memory; the
    module keeps its structure, and the config-derived buffers stay)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                     requires_grad=False)


def _assign(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    local = {k.removeprefix(prefix): v for k, v in state.items()}
    module.load_state_dict(local, strict=True, assign=True)


class StreamedWeights(WeightStore):
    """Layers come from the checkpoint when opened and go to `writer` (or away) when closed.

    Counters for tests and benchmarks: `open_layers` (now), `max_open_layers`, `layer_reads`
    (how often each layer was read), `max_resident_parameters` (of the model, sampled at every open)."""

    def __init__(self, source: TensorSource, adapter: Adapter, model: SlicedForCausalLM,
                 writer: ShardWriter | None, dtype: torch.dtype = torch.float32):
        self.source, self.adapter, self.writer, self.dtype = source, adapter, writer, dtype
        self.open_layers: set[int] = set()
        self.max_open_layers = 0
        self.layer_reads = [0] * model.config.num_hidden_layers
        self.max_resident_parameters = 0
        if model.head_proj is not None:  # D x D, read at the start: the tied table's rotation updates it
            _assign(model.head_proj, head_state(adapter, model.config, source, dtype, table=False), "head_proj.")

    def _sample(self, model) -> None:
        resident = sum(p.numel() for p in model.parameters() if not p.is_meta)
        self.max_resident_parameters = max(self.max_resident_parameters, resident)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            raise RuntimeError("this streamed model has no output writer")
        self.writer.add(tensors)

    def open_embedding(self, model, device) -> None:
        state = embedding_state(self.adapter, model.config, self.source, self.dtype)
        _assign(model.embed_tokens, {k: v for k, v in state.items() if k.startswith("embed_tokens.")}, "embed_tokens.")
        if model.embed_positions is not None:
            _assign(model.embed_positions, {k: v for k, v in state.items() if k.startswith("embed_positions.")},
                    "embed_positions.")
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        super().open_embedding(model, device)
        self._sample(model)

    def close_embedding(self, model, write: bool) -> None:
        super().close_embedding(model, write)
        if write:
            names = ["embed_tokens", "embed_positions", "embed_proj"]
            self._write({f"{n}.weight": getattr(model, n).weight for n in names if getattr(model, n) is not None})
            if model.embed_proj is not None:
                _release(model.embed_proj)
        _release(model.embed_tokens)  # the tied head reads this table: it goes too
        if model.embed_positions is not None:
            _release(model.embed_positions)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight

    def open_layer(self, model, index: int, device) -> None:
        _assign(model.layers[index], layer_state(self.adapter, model.config, self.source, index, self.dtype),
                f"layers.{index}.")
        self.layer_reads[index] += 1
        self.open_layers.add(index)
        self.max_open_layers = max(self.max_open_layers, len(self.open_layers))
        super().open_layer(model, index, device)
        self._sample(model)

    def close_layer(self, model, index: int, write: bool) -> None:
        layer = model.layers[index]
        super().close_layer(model, index, write)
        if write:
            self._write({f"layers.{index}.{k}": v for k, v in layer.state_dict().items()})
        _release(layer)
        self.open_layers.discard(index)

    def open_head(self, model, device, table: bool = True) -> None:
        if table and not model.config.tie_word_embeddings:
            if self.writer is not None:  # write what waits before the V x D head is read
                self.writer.flush()
            _assign(model.lm_head, head_state(self.adapter, model.config, self.source, self.dtype), "lm_head.")
        super().open_head(model, device, table)
        self._sample(model)

    def close_head(self, model, write: bool) -> None:
        for module in (model.head_proj, model.lm_head):
            if module is not None and not module.weight.is_meta:
                module.to("cpu")
        if write:
            tensors = {} if model.head_proj is None else {"head_proj.weight": model.head_proj.weight}
            if not model.config.tie_word_embeddings:
                tensors |= {f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()}
            self._write(tensors)
            if model.head_proj is not None:
                _release(model.head_proj)
        if not model.config.tie_word_embeddings:
            _release(model.lm_head)

    def finish(self, model) -> None:
        if self.open_layers:
            raise RuntimeError(f"layers {sorted(self.open_layers)} were never closed")


def streamed_model(source: TensorSource, hf_config, class_name: str, source_model: str | None,
                   keep_tie: bool, writer: ShardWriter | None, dtype: torch.dtype = torch.float32):
    """(canonical skeleton on the meta device with its derived buffers, its StreamedWeights)."""
    from toolchain.model.adapters import adapter_for
    from toolchain.model.adapters.base import canonical_config

    adapter = adapter_for(hf_config, class_name)
    config = canonical_config(hf_config, source.names, class_name, source_model, keep_tie)
    with torch.device("meta"):
        model = SlicedForCausalLM(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_derived_buffers()
    model.eval()
    return model, StreamedWeights(source, adapter, model, writer, dtype)


def open_checkpoint(path: str | os.PathLike, writer: ShardWriter | None, source_model: str | None = None,
                    keep_tie: bool = True, dtype: torch.dtype = torch.float32):
    """(skeleton, StreamedWeights) for an HF checkpoint dir; only headers and the config are read."""
    from transformers import AutoConfig

    return open_streamed(path, AutoConfig.from_pretrained(path, trust_remote_code=False), writer, source_model,
                         keep_tie, dtype)[:2]


def open_streamed(path: str | os.PathLike, hf_config, writer: ShardWriter | None, source_model: str | None = None,
                  keep_tie: bool = True, dtype: torch.dtype = torch.float32):
    """(skeleton, StreamedWeights, the HF model's meta skeleton) for a checkpoint whose config is read;
    fails, before reading any tensor, if a weight the config needs is missing."""
    from toolchain.data.sources import check_complete, hf_skeleton

    checkpoint = SafetensorsCheckpoint(path)
    skeleton = hf_skeleton(hf_config)
    checkpoint.expect(skeleton)
    check_complete(Path(path), skeleton, checkpoint.names)
    model, weights = streamed_model(checkpoint, hf_config, type(skeleton).__name__, source_model, keep_tie, writer,
                                    dtype)
    return model, weights, skeleton


def slice_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, input_ids, attention_mask, options,
                     keep_tie: bool = True, offload: Path | None = None, shard_bytes: int = SHARD_BYTES,
                     progress=None):
    """Slice the checkpoint at `path` into `out_dir` (an existing, empty dir: config, generation config
    and weight shards; no tokenizer) layer by layer. Returns (skeleton model, its StreamedWeights)."""
    from toolchain.compress.slicegpt import slice_model

    writer = ShardWriter(out_dir, shard_bytes)
    model, weights = open_checkpoint(path, writer, str(path), keep_tie)
    slice_model(model, input_ids, attention_mask, options, progress=progress, weights=weights, offload=offload)
    model.save_pretrained(out_dir, state_dict={})  # config.json + generation_config.json
    writer.finish()
    return model, weights
