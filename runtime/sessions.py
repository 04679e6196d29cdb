"""One Session interface over torch and onnxruntime, so generation, parity and latency code is
written once. Everything crossing the interface is numpy: int64 ids/mask/positions, a past of
(key, value) arrays per layer shaped (batch, kv_heads, past_len, head_dim_of_that_layer), and
logits returned as float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError, first_line
from toolchain.core.iospec import (KV_KINDS, LOGITS, TOKEN_INPUTS, past_feeds, past_kv_shapes, past_name, present_name,
                                   presents)

Past = list[tuple[np.ndarray, np.ndarray]]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class KVShape:
    heads: int
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class BindingPlan:
    """Where each input and output of one step lives, for IO binding on `device`.

    `inputs[name]` / `outputs[name]`: "cpu" or the device the tensor is bound on. `to_host`: the outputs
    turned into numpy after the step (a device → host copy when the device is not the CPU)."""

    device: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    to_host: tuple[str, ...]

    def host_copies(self) -> list[str]:
        """Tensors crossing between host and device every step: host-side inputs of a device session
        and the outputs brought back. Empty on the CPU, where nothing crosses."""
        if self.device == "cpu":
            return []
        return [n for n, where in self.inputs.items() if where == "cpu"] + list(self.to_host)


def binding_plan(input_names: list[str], output_names: list[str], device: str,
                 device_kv: bool | None = None) -> BindingPlan:
    """The binding of one step. `device_kv` (default: True off the CPU): the presents stay where the
    device wrote them and come back as the next step's past, so the cache never crosses to the host;
    only the token inputs (a few int64s) go in and the logits come out. False: every output is copied
    to the host and the past goes back up, the whole cache twice per step."""
    if device_kv is None:
        device_kv = device != "cpu"
    kv_home = device if device_kv else "cpu"
    inputs = {name: "cpu" if name in TOKEN_INPUTS else kv_home for name in input_names}
    outputs = {name: "cpu" if name == LOGITS else kv_home for name in output_names}
    to_host = tuple(name for name in output_names if name == LOGITS or not device_kv)
    return BindingPlan(device, inputs, outputs, to_host)


def host_past(past: Past) -> Past:
    """The cache as numpy arrays, wherever it lives (ORT OrtValues, torch tensors on a GPU); for
    comparing caches, never inside a decode loop."""
    def host(tensor):
        if isinstance(tensor, np.ndarray):
            return tensor
        if hasattr(tensor, "device_name"):  # onnxruntime.OrtValue
            return tensor.numpy()
        return tensor.detach().cpu().numpy()  # torch

    return [(host(key), host(value)) for key, value in past]


class Session:
    """run(input_ids, attention_mask, position_ids, past) -> (logits, present).

    attention_mask covers past + new tokens; `present` is the past for the next call.
    """

    name: str = "session"
    vocab_size: int
    kv_shapes: list[KVShape]
    kv_dtype: np.dtype

    @property
    def num_layers(self) -> int:
        return len(self.kv_shapes)

    def empty_past(self, batch: int) -> Past:
        """The past for a prefill call: every layer's cache with length 0."""
        return [(np.zeros((batch, s.heads, 0, s.key_dim), self.kv_dtype),
                 np.zeros((batch, s.heads, 0, s.value_dim), self.kv_dtype)) for s in self.kv_shapes]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Past) -> tuple[np.ndarray, Past]:
        raise NotImplementedError


class TorchSession(Session):
    """Eager torch: the canonical model (through ListCache) or any HF causal LM (through DynamicCache)."""

    def __init__(self, model, name: str = "torch"):
        import torch

        from toolchain.model.modeling import SlicedForCausalLM

        self.model, self.name = model.eval(), name
        self.canonical = isinstance(model, SlicedForCausalLM)
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if self.canonical:
            self.kv_shapes = [KVShape(heads, k, v) for k, v in zip(config.qk_head_dims, config.v_head_dims)]
        else:
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self.kv_shapes = [KVShape(heads, dim, dim)] * config.num_hidden_layers
        self.vocab_size = config.vocab_size
        self.dtype = next(model.parameters()).dtype
        # numpy has no bfloat16: a bf16 model's cache crosses the interface as fp32
        self.kv_dtype = np.dtype(np.float32) if self.dtype == torch.bfloat16 else np.dtype(str(self.dtype)[6:])
        self.device = next(model.parameters()).device
        self._torch = torch

    def run(self, input_ids, attention_mask, position_ids, past):
        torch = self._torch
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731  (no copy on CPU)
        kv = [(tensor(k).to(self.dtype), tensor(v).to(self.dtype)) for k, v in past]
        with torch.inference_mode():
            if self.canonical:
                from toolchain.model.modeling import ListCache

                cache = ListCache(kv)
            else:
                from transformers.cache_utils import DynamicCache

                cache = DynamicCache(kv) if kv and kv[0][0].shape[2] else DynamicCache()
            out = self.model(input_ids=tensor(input_ids), attention_mask=tensor(attention_mask),
                             position_ids=tensor(position_ids), past_key_values=cache, use_cache=True)
            present = cache.present if self.canonical else [(layer.keys, layer.values) for layer in cache.layers]
            logits = out.logits.float().cpu().numpy()
            host = lambda t: t.cpu().numpy() if t.dtype != torch.bfloat16 else t.float().cpu().numpy()  # noqa: E731
            return logits, [(host(k), host(v)) for k, v in present]


class OrtSession(Session):
    """onnxruntime over an exported dir or .onnx file, on one named provider (no silent fallback).

    Inputs are bound in place and outputs are ORT-allocated (`binding_plan`). With `ort_cache=True`
    the presents are returned as ORT's own OrtValues and bound straight back as the next step's past
    (IO binding, no round trip through numpy); `run` accepts either kind of past. On CUDA and
    TensorRT providers that is the default (`ort_cache=None`): the KV cache stays on the device and
    only the logits reach the host each step (`host_past` copies a cache out for comparisons).
    `spinning=False` stops ORT's idle worker threads from busy-waiting between ops, which on a shared
    or small machine (2 cores here) costs more than it saves; None keeps ORT's default.

    `kv_buffer=N` (CPU, fast graphs with GroupQueryAttention only): the KV cache lives in one
    preallocated (batch, kv_heads, N, head_dim) buffer per layer that is bound as both the past input
    and the present output, so GroupQueryAttention appends the new keys/values in place (ORT's
    past/present buffer sharing, as onnxruntime-genai does) instead of copying the whole cache every
    step. The presents returned are numpy views of the first `total` positions of those buffers, so
    the Session contract is unchanged; passing them back continues in place, any other past is
    copied into fresh buffers first. N bounds past + new tokens.
    """

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None, name: str | None = None,
                 ort_cache: bool | None = None, spinning: bool | None = None, profile_prefix: str | None = None,
                 kv_buffer: int | None = None):
        import onnxruntime as ort

        self.path = resolve_onnx_path(path)
        self.provider = provider_name(provider)
        self.device = "cuda" if provider.lower() in ("cuda", "tensorrt") else "cpu"
        self.ort_cache = self.device != "cpu" if ort_cache is None else ort_cache
        self._ort = ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        options.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are not the user's problem
        if self.device != "cpu" and (reason := _cuda_blocker(self.path)) is not None:
            raise ArtifactError(f"{self.path} cannot run on the {provider} provider: {reason}; export it with "
                                "`--optimize basic` for GPUs, or run it with --provider cpu")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=[self.provider])
        except Exception as err:  # noqa: BLE001  (pybind raises several unrelated types for bad files)
            raise ArtifactError(f"{self.path} cannot be loaded by onnxruntime ({first_line(err)}); the file is "
                                "corrupted or truncated, or its .data file is missing: re-run `toolchain export`") from err
        if self.session.get_providers()[0] != self.provider:
            raise BackendUnavailableError(f"onnxruntime could not initialise {self.provider} for {self.path} (it "
                                          f"fell back to {self.session.get_providers()[0]}); check the GPU drivers "
                                          "and CUDA/TensorRT libraries, or use --provider cpu")
        self.name = name or f"ort-{provider}"
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.plan = binding_plan(list(self._inputs), self._outputs, self.device, self.ort_cache)
        self.kv_shapes, self.kv_dtype = _kv_layout(self._inputs, self.path)
        self.vocab_size = _vocab_size(self.session, self.path)
        self.kv_buffer = kv_buffer
        self._shared: tuple | None = None  # (numpy KV buffers, the present handed out last, their IO binding)
        if kv_buffer is not None:
            self._check_shared_kv()

    def _check_shared_kv(self) -> None:
        import onnx

        if self.device != "cpu" or self.ort_cache:
            raise InvalidOptionError("kv_buffer (in-place KV cache) is implemented for the CPU provider with numpy "
                                     "presents; drop kv_buffer or ort_cache")
        export_config = self.path.parent / "export_config.json"
        if export_config.is_file():  # cheap: the graph file may hold GBs of inline weights
            fast = json.loads(export_config.read_text()).get("graph") == "fast"
        else:
            graph = onnx.load(str(self.path), load_external_data=False)
            fast = any(node.op_type == "GroupQueryAttention" for node in graph.graph.node)
            del graph
        if not fast:
            raise InvalidOptionError(f"{self.path} has no GroupQueryAttention: only the fast graph (`toolchain export "
                                     "--optimize fast`) can update its KV cache in place; drop kv_buffer")

    def run(self, input_ids, attention_mask, position_ids, past):
        if self.kv_buffer is not None:
            return self._run_shared(input_ids, attention_mask, position_ids, past)
        binding = self.session.io_binding()
        feeds = {**dict(zip(TOKEN_INPUTS, (input_ids, attention_mask, position_ids))), **past_feeds(past)}
        for name, array in feeds.items():
            if name not in self._inputs:  # e.g. position_ids is optional for learned-position graphs elsewhere
                continue
            if isinstance(array, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, array)
            else:
                binding.bind_cpu_input(name, _as_type(array, self._inputs[name].type))
        for name, where in self.plan.outputs.items():
            binding.bind_output(name, where)
        self.session.run_with_iobinding(binding)
        out = dict(zip(self._outputs, binding.get_outputs()))
        for name in self.plan.to_host:  # the rest (ort_cache: the presents) stays ORT-owned
            out[name] = out[name].numpy()
        return out[LOGITS].astype(np.float32, copy=False), presents(out, self.num_layers)


    def _run_shared(self, input_ids, attention_mask, position_ids, past):
        ort = self._ort
        batch, total = attention_mask.shape
        if total > self.kv_buffer:
            raise InvalidOptionError(f"{total} tokens exceed this session's KV buffer of {self.kv_buffer}; open the "
                                     "session with a larger kv_buffer")
        if self._shared is None or past is not self._shared[1] or self._shared[0][0][0].shape[0] != batch:
            buffers = [(np.zeros((batch, s.heads, self.kv_buffer, s.key_dim), self.kv_dtype),
                        np.zeros((batch, s.heads, self.kv_buffer, s.value_dim), self.kv_dtype)) for s in self.kv_shapes]
            for (key_buf, value_buf), (key, value) in zip(buffers, past):
                length = np.asarray(key).shape[2]
                key_buf[:, :, :length], value_buf[:, :, :length] = key, value
            binding = self.session.io_binding()  # the KV buffers are bound once, for every step on them
            binding.bind_output(LOGITS, "cpu")
            for i, pair in enumerate(buffers):
                for kind, buffer in zip(KV_KINDS, pair):
                    value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the numpy buffer's memory
                    binding.bind_ortvalue_input(past_name(i, kind), value)
                    binding.bind_ortvalue_output(present_name(i, kind), value)
            self._shared = (buffers, None, binding)
        buffers, _, binding = self._shared
        for name, array in zip(TOKEN_INPUTS, (input_ids, attention_mask, position_ids)):
            if name in self._inputs:
                binding.bind_cpu_input(name, _as_type(array, self._inputs[name].type))
        binding.bind_output(LOGITS, "cpu")  # rebound: its shape changes between prefill and decode
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        present = [(key[:, :, :total], value[:, :, :total]) for key, value in buffers]
        self._shared = (buffers, present, binding)
        return logits.astype(np.float32, copy=False), present


def cuda_attention_blocker(nodes) -> str | None:
    """Why ORT's CUDA kernels cannot run these graph nodes, or None. Its CUDA GroupQueryAttention has
    fp16/bf16 kernels only and refuses an attention_bias input (it takes padding as per-row lengths,
    right-padded); the fast graph passes left padding as that bias, so every run would fail."""
    for node in nodes:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 10 and node.input[10]:
            return ("its GroupQueryAttention takes the padding mask as attention_bias, which ORT's CUDA "
                    "GroupQueryAttention kernel refuses")
    return None


def _cuda_blocker(path: Path) -> str | None:
    import onnx

    export_config = path.parent / "export_config.json"
    if export_config.is_file() and json.loads(export_config.read_text()).get("graph") != "fast":
        return None  # cheap: only the fast graph carries GroupQueryAttention
    return cuda_attention_blocker(onnx.load(str(path), load_external_data=False).graph.node)


def provider_name(provider: str) -> str:
    """cpu/cuda/tensorrt → the ORT provider, refusing ones this onnxruntime build does not have."""
    import onnxruntime as ort

    key = provider.lower()
    if key not in PROVIDERS:
        raise InvalidOptionError(f"unknown --provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[key]
    available = ort.get_available_providers()
    if name not in available:
        hint = "pip install onnxruntime-gpu (and CUDA/cuDNN" + (", TensorRT" if key == "tensorrt" else "") + ")"
        raise BackendUnavailableError(f"{name} is not available in this onnxruntime build (available: "
                                      f"{', '.join(available)}); {hint}, or use --provider cpu")
    return name


def resolve_onnx_path(path: str | Path) -> Path:
    """A .onnx file, or an export dir holding model.onnx."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; export the model first (`toolchain export ... --out DIR`)")
    return path


def open_session(path: str | Path, provider: str = "cpu", dtype: str = "fp32", name: str | None = None) -> Session:
    """An OrtSession for ONNX files/dirs, else a TorchSession over the torch model dir or hub id."""
    path = Path(path).expanduser()
    if path.suffix == ".onnx" or (path / "model.onnx").is_file():
        return OrtSession(path, provider, name=name)
    import torch

    from runtime.loading import load_causal_lm

    if provider != "cpu":
        provider_name(provider)  # reject unknown names the same way
    model, _ = load_causal_lm(path, dtype=torch.float16 if dtype == "fp16" else torch.float32)
    return TorchSession(model, name=name or "torch")


_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16}


def _as_type(array: np.ndarray, ort_type: str) -> np.ndarray:
    dtype = _ORT_TYPES.get(ort_type)
    array = np.asarray(array)
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))


def _kv_layout(inputs: dict, path: Path) -> tuple[list[KVShape], np.dtype]:
    layers = past_kv_shapes({name: value.shape for name, value in inputs.items()})
    if not layers:
        raise ArtifactError(f"the ONNX graph has no {past_name('{i}', 'key')} inputs; export it with "
                            "`toolchain export` (KV-cache graph with optimum/genai names)")
    head_size = None
    if any(not isinstance(dim, int) for key, value in layers for dim in (key[1], key[3], value[3])):
        head_size = _genai_head_size(path)  # onnxruntime-genai's builder leaves the KV head dim symbolic
    shapes = [KVShape(int(key[1]), int(key[3]) if isinstance(key[3], int) else head_size,
                      int(value[3]) if isinstance(value[3], int) else head_size) for key, value in layers]
    return shapes, np.dtype(_ORT_TYPES[inputs[past_name(len(layers) - 1, "key")].type])


def _genai_head_size(path: Path) -> int:
    config = path.parent / "genai_config.json"
    try:
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    except (OSError, KeyError, ValueError, TypeError):
        raise ArtifactError(f"{path} leaves the KV cache's head size symbolic and there is no readable "
                            f"{config.name} beside it to give it; export the model with `toolchain export`") from None


def _vocab_size(session, path: Path) -> int:
    """From the logits shape, else from export_config.json beside the graph."""
    logits = next((o for o in session.get_outputs() if o.name == LOGITS), None)
    if logits is None:
        raise ArtifactError(f"{path} has no `logits` output; export it with `toolchain export`")
    if isinstance(logits.shape[-1], int):
        return logits.shape[-1]
    config = path.parent / "export_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["vocab_size"])
    raise ArtifactError(f"{path}: the vocab size is neither static in the graph nor in export_config.json; re-export")
