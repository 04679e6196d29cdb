"""Roofline planner: from a model config alone (no weights), will the dense and the SliceGPT-sliced
model fit on a GPU, and how fast can they be at best?

Every number is a bound or a plain estimate from shapes, bytes and datasheet peaks; nothing is run.

Formulas (B = batch, T = prompt tokens = `context`, C = cached tokens, w = bytes per weight,
a = bytes per activation/KV element = 4 for fp32 else 2; L layers, H query heads, G KV heads,
hq/hv = query-key / value head dims, I = MLP width, V = vocab, D = residual width):

  weights    = parameters × w                (int8 = 1, int4 = 0.5 bytes; quantisation scales ignored)
  KV cache   = B · C · G · Σ_layers (hq + hv) · a    (= 2·L·B·C·G·head_dim·a; SliceGPT leaves it as is)
  workspace  = B · T · (2·D + max(H·hq + G·(hq+hv) + H·hv, k·I)) · a + B · V · 4
               (one layer's live activations during a prefill of T tokens, k = 3 gated / 2 plain MLP,
               attention by SDPA/flash so no T×T scores, plus fp32 logits of the last position)
  need       = weights + KV cache (C = context) + workspace + OVERHEAD_BYTES (CUDA context, cuBLAS
               workspaces, allocator slack) on one GPU; it fits if need ≤ USABLE_FRACTION × memory
  #GPUs      = ceil((weights + KV + workspace) / (USABLE_FRACTION × memory − OVERHEAD_BYTES))
  FLOPs      = 2 · B · T_new · (matmul weights of the blocks and shortcuts)
               + 2 · B · V · D_head                          (logits of the last position only)
               + Σ_layers 2 · B · H · (hq + hv) · (T_new·C + T_new·(T_new+1)/2)   (causal attention)
  bytes read = all weights except the embedding/position tables (a lookup reads B rows; a tied table
               is read whole as the head) + KV read (decode: C = context) or written (prefill: T)
  time ≥ max(FLOPs / (n · peak · e_c), bytes / (n · bandwidth · e_b))
               n GPUs with ideal tensor parallelism (no communication cost); e_c = e_b = 1 unless
               calibrated with `fit_efficiency`. Prefill = the whole `context` prompt; decode = one
               token with `context` tokens already cached. tokens/s = B·T / prefill, B / decode.

SliceGPT shapes (slice fraction s, the paper's and TransformerCompression's schedule): every residual
position gets width d = int((1−s)·D) rounded down to a multiple of 8; the embedding becomes V×d;
q/k/v read d, o_proj writes d; MLP up/gate read d, down writes d; a d×d shortcut per residual position
(2 per layer, 1 for parallel Phi-2 blocks) except the last, which is d×D because the final norm and LM
head stay full width; the LM head stays V×D and is untied (a tied model keeps V×d embedding + V×D head).
`slice_head=True`: head V×d, last shortcut and last writer d wide. Fused norms are weightless; a
LayerNorm's bias folds into biases of the linears that read it (so OPT's head gains a V bias).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from toolchain.core.errors import (
    ArtifactError,
    InvalidOptionError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

GiB = 1 << 30
USABLE_FRACTION = 0.90  # the driver, ECC and fragmentation leave ~10 % of the nominal memory unusable
OVERHEAD_BYTES = 1 * GiB  # per GPU: CUDA context (~0.3-0.5 GB) + cuBLAS/cuDNN workspaces + allocator slack
ROUND_TO = 8  # SliceGPT's default rounding of the sliced width
SCHEMA = "toolchain.plan/1"

WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16", "q8": "int8", "q4": "int4"}


# --- GPUs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # nominal capacity; NVIDIA's "GB" for GPU memory is GiB (a 4090 shows 24564 MiB)
    bandwidth: float  # bytes/s, decimal as in the datasheets
    fp16_flops: float  # dense fp16/bf16 tensor-core peak with fp32 accumulation, no 2:4 sparsity
    fp32_flops: float  # non-tensor fp32 peak (PyTorch does not use TF32 for matmuls by default)
    source: str
    aliases: tuple[str, ...] = ()

    def peak_flops(self, dtype: str) -> float:
        # int8/int4 here are weight-only formats: the matmuls still run in fp16
        return self.fp32_flops if dtype == "fp32" else self.fp16_flops

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("aliases")
        return out


_T = 1e12
GPU_SPECS: tuple[GPUSpec, ...] = (
    GPUSpec("rtx4090-24gb", 24 * GiB, 1008e9, 165.2 * _T, 82.6 * _T,
            "NVIDIA Ada Lovelace GPU Architecture whitepaper, Appendix A (GeForce RTX 4090): 24 GB GDDR6X, "
            "1008 GB/s, FP16/BF16 tensor 165.2 TFLOPS with FP32 accumulate (330.3 with FP16 accumulate), "
            "FP32 82.6 TFLOPS",
            ("rtx4090", "4090", "geforcertx4090", "nvidiageforcertx4090")),
    GPUSpec("rtx3090-24gb", 24 * GiB, 936e9, 71 * _T, 35.6 * _T,
            "NVIDIA Ampere GA102 GPU Architecture whitepaper, Table 9 (GeForce RTX 3090): 24 GB GDDR6X, "
            "936 GB/s, FP16/BF16 tensor 71 TFLOPS with FP32 accumulate (142 with FP16 accumulate), "
            "FP32 35.6 TFLOPS",
            ("rtx3090", "3090", "geforcertx3090", "nvidiageforcertx3090")),
    GPUSpec("a100-40gb", 40 * GiB, 1555e9, 312 * _T, 19.5 * _T,
            "NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM column: HBM2 1,555 GB/s, "
            "FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), FP32 19.5 TFLOPS",
            ("a100sxm440gb", "nvidiaa100sxm440gb", "a10040gbsxm")),
    GPUSpec("a100-80gb", 80 * GiB, 2039e9, 312 * _T, 19.5 * _T,
            "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: HBM2e 2,039 GB/s, "
            "FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), FP32 19.5 TFLOPS",
            ("a100sxm480gb", "nvidiaa100sxm480gb", "a10080gbsxm")),
    GPUSpec("h100-80gb", 80 * GiB, 3.35e12, 989.5 * _T, 67 * _T,
            "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 80 GB HBM3, 3.35 TB/s, "
            "FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989.5 dense, FP32 67 TFLOPS",
            ("h100", "h100sxm", "h100sxm580gb", "nvidiah10080gbhbm3")),
    GPUSpec("h200-141gb", 141 * GiB, 4.8e12, 989.5 * _T, 67 * _T,
            "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 141 GB HBM3e, 4.8 TB/s, "
            "FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989.5 dense, FP32 67 TFLOPS",
            ("h200", "h200sxm", "nvidiah200")),
)
GPUS: dict[str, GPUSpec] = {spec.name: spec for spec in GPU_SPECS}


def _norm_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def get_gpu(name: str | Mapping) -> GPUSpec:
    """A GPU by table name, alias or torch.cuda.get_device_name() text; a dict defines a custom one."""
    if isinstance(name, Mapping):
        try:
            return GPUSpec(name=str(name["name"]), memory_bytes=int(name["memory_bytes"]),
                           bandwidth=float(name["bandwidth"]), fp16_flops=float(name["fp16_flops"]),
                           fp32_flops=float(name.get("fp32_flops", name["fp16_flops"])),
                           source=str(name.get("source", "user supplied")))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidOptionError(
                f"a custom GPU needs name, memory_bytes, bandwidth (bytes/s) and fp16_flops; got {dict(name)}") from err
    key = _norm_name(str(name))
    for spec in GPU_SPECS:
        if key == _norm_name(spec.name) or key in spec.aliases:
            return spec
    raise InvalidOptionError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} or 'all'")


def select_gpus(names: str | Iterable[str] | None) -> list[GPUSpec]:
    """'all' / None -> every row; otherwise a comma-separated string or a list of names."""
    if names is None or (isinstance(names, str) and names.strip().lower() in ("", "all")):
        return list(GPU_SPECS)
    items = names.split(",") if isinstance(names, str) else list(names)
    return [get_gpu(item.strip()) for item in items if str(item).strip()]


# --- known public configs (the planner must work offline) --------------------------------------

def _llama(hidden, inter, layers, heads, kv, vocab, **extra) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": False, **extra}


def _opt(hidden, ffn, layers, heads) -> dict:
    return {"model_type": "opt", "hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": hidden, "do_layer_norm_before": True, "enable_bias": True,
            "tie_word_embeddings": True}


# Shape fields of public config.json files, keyed by hub id; `short` is what users type.
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000, short="llama-2-7b"),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000, short="llama-2-13b"),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000, short="llama-2-70b"),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, short="llama-3-8b"),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, short="llama-3-70b"),
    "meta-llama/Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8, 128256, short="llama-3.1-8b"),
    "meta-llama/Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_word_embeddings=True,
                                      short="llama-3.2-1b"),
    "meta-llama/Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, 128256, head_dim=128, tie_word_embeddings=True,
                                      short="llama-3.2-3b"),
    "HuggingFaceTB/SmolLM2-135M": _llama(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True, short="smollm2-135m"),
    "HuggingFaceTB/SmolLM2-360M": _llama(960, 2560, 32, 15, 5, 49152, tie_word_embeddings=True, short="smollm2-360m"),
    "HuggingFaceTB/SmolLM2-1.7B": _llama(2048, 8192, 24, 32, 32, 49152, tie_word_embeddings=True,
                                         short="smollm2-1.7b"),
    "mistralai/Mistral-7B-v0.1": {**_llama(4096, 14336, 32, 32, 8, 32000), "model_type": "mistral",
                                  "short": "mistral-7b"},
    "Qwen/Qwen2-0.5B": {**_llama(896, 4864, 24, 14, 2, 151936), "model_type": "qwen2", "tie_word_embeddings": True,
                        "short": "qwen2-0.5b"},
    "Qwen/Qwen2-1.5B": {**_llama(1536, 8960, 28, 12, 2, 151936), "model_type": "qwen2", "tie_word_embeddings": True,
                        "short": "qwen2-1.5b"},
    "Qwen/Qwen2-7B": {**_llama(3584, 18944, 28, 28, 4, 152064), "model_type": "qwen2", "short": "qwen2-7b"},
    "microsoft/Phi-3-mini-4k-instruct": {**_llama(3072, 8192, 32, 32, 32, 32064), "model_type": "phi3",
                                         "short": "phi-3-mini"},
    "microsoft/phi-2": {"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
                        "vocab_size": 51200, "partial_rotary_factor": 0.4, "qk_layernorm": False,
                        "tie_word_embeddings": False, "short": "phi-2"},
    "facebook/opt-125m": {**_opt(768, 3072, 12, 12), "short": "opt-125m"},
    "facebook/opt-1.3b": {**_opt(2048, 8192, 24, 32), "short": "opt-1.3b"},
    "facebook/opt-2.7b": {**_opt(2560, 10240, 32, 32), "short": "opt-2.7b"},
    "facebook/opt-6.7b": {**_opt(4096, 16384, 32, 32), "short": "opt-6.7b"},
    "facebook/opt-13b": {**_opt(5120, 20480, 40, 40), "short": "opt-13b"},
    "facebook/opt-30b": {**_opt(7168, 28672, 48, 56), "short": "opt-30b"},
    "facebook/opt-66b": {**_opt(9216, 36864, 64, 72), "short": "opt-66b"},
}


def known_config(spec: str) -> dict | None:
    """The built-in config for a short name or hub id (case-insensitive), or None."""
    key = spec.strip().lower()
    for hub_id, cfg in KNOWN_CONFIGS.items():
        if key in (hub_id.lower(), cfg["short"]):
            return {**cfg, "_name_or_path": hub_id}
    return None


def resolve_config(spec: str) -> dict:
    """--model for planning -> config dict: built-in short name / hub id, a local dir or config.json,
    or a hub id whose config.json is already in the Hugging Face cache. Never touches the network."""
    text = str(spec).strip()
    if not text:
        raise ModelNotFoundError("--model is empty; pass a short name (e.g. llama-2-7b), a dir or a config.json")
    known = known_config(text)
    if known is not None:
        return known
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{path.parent} has no config.json; pass the checkpoint dir or its config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"{path} is a GGUF file; the planner reads config.json, so pass the checkpoint dir "
                                 "`toolchain` converted it into, or the original model's short name / config.json")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path} is not valid JSON ({err}); pass a Hugging Face config.json") from err
        if not isinstance(cfg, dict):
            raise ArtifactError(f"{path} is not a JSON object; pass a Hugging Face config.json")
        return {"_name_or_path": str(path.parent if path.name == "config.json" else path), **cfg}
    cached = _cached_hub_config(text)
    if cached is not None:
        return cached
    shorts = ", ".join(cfg["short"] for cfg in KNOWN_CONFIGS.values())
    raise ModelNotFoundError(
        f"{text} is not a built-in name, a local dir/config.json, or a hub id with config.json in the Hugging Face "
        f"cache; pass one of {shorts}, or copy the model's config.json here and pass its path "
        f"(on a machine with internet: `hf download {text} config.json`)")


def _cached_hub_config(repo_id: str) -> dict | None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001  (no hub library or a malformed cache: treat as not cached)
        return None
    if not isinstance(found, (str, os.PathLike)):
        return None
    return {"_name_or_path": repo_id, **json.loads(Path(found).read_text(encoding="utf-8"))}


# --- model shape --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a config: widths, counts and which tensors exist."""

    name: str
    arch: str
    hidden_size: int  # D, the original residual width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qk_head_dims: tuple[int, ...]  # per layer
    v_head_dims: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    vocab_size: int
    gated_mlp: bool
    parallel_block: bool
    layer_norm: bool  # LayerNorm with bias (OPT, Phi-2) rather than RMSNorm
    qkv_bias: bool
    o_bias: bool
    mlp_up_bias: bool
    mlp_down_bias: bool
    lm_head_bias: bool
    qk_norm: bool = False  # Phi's optional per-head q/k LayerNorm
    position_rows: int = 0  # rows of a learned position table (0 = rotary)
    tied_embeddings: bool = False
    embed_proj: int = 0  # OPT-350m's word_embed_proj_dim when it differs from D
    post_norm: bool = False  # OPT-350m: post-LayerNorm blocks, which SliceGPT cannot slice
    residual_widths: tuple[int, ...] | None = None  # already-sliced canonical model: per position + head
    shortcuts: tuple[bool, ...] | None = None

    @property
    def positions(self) -> int:
        return self.num_layers * (1 if self.parallel_block else 2)

    @property
    def is_sliced(self) -> bool:
        return self.residual_widths is not None


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return resolve_config(str(config))
    if hasattr(config, "to_dict"):  # transformers.PretrainedConfig
        return config.to_dict()
    raise InvalidOptionError(
        f"cannot read a model config from {type(config).__name__}; pass a dict, a path or an AutoConfig")


def _need(cfg: dict, *keys: str, name: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise UnsupportedArchitectureError(f"{name}: config lacks {keys[0]!r}; pass a complete Hugging Face config.json")


def model_shape(config: Any) -> ModelShape:
    """ModelShape from a config dict, a config.json path/dir, a built-in name or a transformers config."""
    cfg = _as_dict(config)
    arch = str(cfg.get("model_type", ""))
    name = str(cfg.get("_name_or_path") or arch or "model")
    if arch == "sliced_decoder" or "residual_widths" in cfg:
        return _canonical_shape(cfg, name)
    hidden = _need(cfg, "hidden_size", "d_model", name=name)
    layers = _need(cfg, "num_hidden_layers", "n_layer", name=name)
    heads = _need(cfg, "num_attention_heads", "n_head", name=name)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = _need(cfg, "vocab_size", name=name)
    common = dict(name=name, arch=arch, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                  qk_head_dims=(head_dim,) * layers, v_head_dims=(head_dim,) * layers, vocab_size=vocab)
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        inter = _need(cfg, "intermediate_size", name=name)
        attn_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        return ModelShape(**common, intermediate_sizes=(inter,) * layers, gated_mlp=True, parallel_block=False,
                          layer_norm=False, qkv_bias=attn_bias or arch == "qwen2", o_bias=attn_bias,
                          mlp_up_bias=mlp_bias, mlp_down_bias=mlp_bias, lm_head_bias=False,
                          tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if arch == "opt":
        inter = _need(cfg, "ffn_dim", name=name)
        bias = bool(cfg.get("enable_bias", True))
        proj = int(cfg.get("word_embed_proj_dim") or hidden)
        return ModelShape(**common, intermediate_sizes=(inter,) * layers, gated_mlp=False, parallel_block=False,
                          layer_norm=True, qkv_bias=bias, o_bias=bias, mlp_up_bias=bias, mlp_down_bias=bias,
                          lm_head_bias=False, position_rows=int(cfg.get("max_position_embeddings", 2048)) + 2,
                          tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                          embed_proj=proj if proj != hidden else 0,
                          post_norm=not cfg.get("do_layer_norm_before", True))
    if arch == "phi":
        inter = _need(cfg, "intermediate_size", name=name)
        return ModelShape(**common, intermediate_sizes=(inter,) * layers, gated_mlp=False, parallel_block=True,
                          layer_norm=True, qkv_bias=True, o_bias=True, mlp_up_bias=True, mlp_down_bias=True,
                          lm_head_bias=True, qk_norm=bool(cfg.get("qk_layernorm", False)),
                          tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    raise UnsupportedArchitectureError(
        f"{name}: model_type {arch!r} is not one the planner knows; supported: llama, mistral, qwen2, phi3, opt, "
        "phi and sliced_decoder")


def _per_layer(cfg: dict, key: str, layers: int, default: int) -> tuple[int, ...]:
    value = cfg.get(key)
    if value is None:
        return (default,) * layers
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * layers


def _canonical_shape(cfg: dict, name: str) -> ModelShape:
    """toolchain.model.modeling.SlicedConfig: per-position residual widths, per-layer MLP and head widths."""
    hidden = _need(cfg, "hidden_size", name=name)
    layers = _need(cfg, "num_hidden_layers", name=name)
    heads = _need(cfg, "num_attention_heads", name=name)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    parallel = bool(cfg.get("parallel_block", False))
    n_pos = layers * (1 if parallel else 2)
    widths = [int(w) for w in (cfg.get("residual_widths") or [hidden] * (n_pos + 1))]
    if len(widths) == n_pos:  # no head entry: the head reads the full width, as SliceGPT's default
        widths.append(hidden)
    shortcuts = cfg.get("shortcuts")
    shortcuts = [bool(s) for s in shortcuts] if shortcuts is not None else [True] * n_pos
    inter = _per_layer(cfg, "intermediate_sizes", layers, int(cfg.get("intermediate_size") or 4 * hidden))
    if len(widths) != n_pos + 1 or len(shortcuts) != n_pos or len(inter) != layers:
        raise UnsupportedArchitectureError(
            f"{name}: residual_widths needs {n_pos + 1} entries, shortcuts {n_pos} and intermediate_sizes {layers}; "
            "the config.json is inconsistent, re-save the model")
    learned = cfg.get("position_embedding") == "learned"
    rows = int(cfg.get("max_position_embeddings", 0)) + int(cfg.get("learned_position_offset", 0)) if learned else 0
    return ModelShape(
        name=name, arch="sliced_decoder", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        qk_head_dims=_per_layer(cfg, "qk_head_dims", layers, head_dim),
        v_head_dims=_per_layer(cfg, "v_head_dims", layers, head_dim),
        intermediate_sizes=inter, vocab_size=_need(cfg, "vocab_size", name=name),
        gated_mlp=bool(cfg.get("gated_mlp", True)), parallel_block=parallel, layer_norm=False,
        qkv_bias=bool(cfg.get("qkv_bias", False)), o_bias=bool(cfg.get("o_bias", False)),
        mlp_up_bias=bool(cfg.get("mlp_up_bias", False)), mlp_down_bias=bool(cfg.get("mlp_down_bias", False)),
        lm_head_bias=bool(cfg.get("lm_head_bias", False)), position_rows=rows,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        residual_widths=tuple(widths), shortcuts=tuple(shortcuts))


# --- layouts and parameter counts ---------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Residual widths (one per position, then the head input), shortcut flags, norm fusion, tying."""

    widths: tuple[int, ...]
    shortcuts: tuple[bool, ...]
    fused: bool  # norms folded into the linears (SliceGPT / canonical model): weightless norms
    tied: bool


def slice_width(hidden: int, fraction: float, round_to: int = ROUND_TO) -> int:
    """d = int((1-s)·D) rounded down to a multiple of 8 (same float arithmetic as the compressor)."""
    check_slice(fraction)
    width = int((1.0 - fraction) * hidden) // round_to * round_to if fraction > 0 else hidden
    if width <= 0:
        raise InvalidOptionError(f"--slice {fraction} leaves no width of {hidden} (rounded to {round_to}); "
                                 "use a smaller --slice")
    return width


def check_slice(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise InvalidOptionError(
            f"--slice must be in [0, 1), got {fraction}; e.g. --slice 0.3 removes 30% of the width")


def dense_layout(shape: ModelShape) -> Layout:
    if shape.is_sliced:
        return Layout(shape.residual_widths, shape.shortcuts, True,
                      shape.tied_embeddings and shape.residual_widths[0] == shape.residual_widths[-1])
    n = shape.positions
    return Layout((shape.hidden_size,) * (n + 1), (False,) * n, False, shape.tied_embeddings)


def sliced_layout(shape: ModelShape, fraction: float, slice_head: bool = False) -> Layout:
    if shape.is_sliced:
        raise InvalidOptionError(f"{shape.name} is already sliced; plan it with --slice 0 or slice the original model")
    if shape.post_norm or shape.embed_proj:
        raise UnsupportedArchitectureError(
            f"{shape.name}: post-LayerNorm OPT variants (opt-350m) cannot be sliced; pick another OPT size")
    d = slice_width(shape.hidden_size, fraction)
    n = shape.positions
    head = d if slice_head else shape.hidden_size
    return Layout((d,) * n + (head,), (True,) * n, True, False)  # slicing unties a tied head


def _block_io(shape: ModelShape, layer: int) -> tuple[int, int, int, int]:
    """Residual positions read/written by (attention, MLP) of a layer: (attn_in, attn_out, mlp_in, mlp_out)."""
    if shape.parallel_block:
        return layer, layer + 1, layer, layer + 1
    return 2 * layer, 2 * layer + 1, 2 * layer + 1, 2 * layer + 2


def count_params(shape: ModelShape, layout: Layout | None = None) -> dict[str, int]:
    """Parameters by group (a tied table counted once) plus `matmul_body`: weights that multiply every
    token (blocks, shortcuts, OPT projections), used for FLOPs."""
    lay = layout or dense_layout(shape)
    w, D, V = lay.widths, shape.hidden_size, shape.vocab_size
    ln_fused = lay.fused and shape.layer_norm  # a folded LayerNorm bias needs a bias on every reader
    norm_size = 0 if lay.fused else (2 * D if shape.layer_norm else D)
    qkv_bias = shape.qkv_bias or ln_fused
    up_bias = shape.mlp_up_bias or ln_fused
    g = {"embedding": 0, "positions": 0, "attention": 0, "mlp": 0, "norms": 0, "shortcuts": 0, "lm_head": 0}
    matmul = 0
    table_width = shape.embed_proj or w[0]
    g["embedding"] = V * table_width
    g["positions"] = shape.position_rows * w[0]
    if shape.embed_proj:  # OPT-350m project_in / project_out, no biases
        g["attention"] += 2 * shape.embed_proj * D
        matmul += 2 * shape.embed_proj * D
    for layer in range(shape.num_layers):
        a_in, a_out, m_in, m_out = _block_io(shape, layer)
        q = shape.num_heads * shape.qk_head_dims[layer]
        k = shape.num_kv_heads * shape.qk_head_dims[layer]
        v = shape.num_kv_heads * shape.v_head_dims[layer]
        o_in = shape.num_heads * shape.v_head_dims[layer]
        attn_w = w[a_in] * (q + k + v) + o_in * w[a_out]
        g["attention"] += attn_w + (q + k + v) * qkv_bias + w[a_out] * shape.o_bias
        if shape.qk_norm:
            g["attention"] += 2 * 2 * shape.qk_head_dims[layer]
        inner, n_up = shape.intermediate_sizes[layer], (2 if shape.gated_mlp else 1)
        mlp_w = n_up * w[m_in] * inner + inner * w[m_out]
        g["mlp"] += mlp_w + n_up * inner * up_bias + w[m_out] * shape.mlp_down_bias
        g["norms"] += norm_size * (1 if shape.parallel_block else 2)
        own = {a_in} if shape.parallel_block else {a_in, m_in}
        short = sum(w[p] * w[p + 1] for p in sorted(own) if lay.shortcuts[p])
        g["shortcuts"] += short
        matmul += attn_w + mlp_w + short
    g["norms"] += norm_size  # final norm
    head_bias = V if (shape.lm_head_bias or ln_fused) else 0
    g["lm_head"] = (0 if lay.tied else V * (shape.embed_proj or w[-1])) + head_bias
    return {**g, "total": sum(g.values()), "matmul_body": matmul}


# --- costs --------------------------------------------------------------------------------------


def normalise_dtype(dtype: str) -> str:
    key = str(dtype).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in WEIGHT_BYTES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(WEIGHT_BYTES)}")
    return key


def _act_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2  # int8/int4 are weight-only: activations and KV stay 16-bit


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, dtype: str) -> int:
    """K and V for `tokens` cached tokens: B·tokens·G·Σ(hq+hv)·a; SliceGPT does not change it."""
    per_token = shape.num_kv_heads * sum(q + v for q, v in zip(shape.qk_head_dims, shape.v_head_dims))
    return batch * tokens * per_token * _act_bytes(dtype)


def workspace_bytes(shape: ModelShape, layout: Layout, batch: int, tokens: int, dtype: str) -> int:
    width = max(layout.widths)
    attn = max(shape.num_heads * (q + v) + shape.num_kv_heads * (q + v)
               for q, v in zip(shape.qk_head_dims, shape.v_head_dims))
    mlp = (3 if shape.gated_mlp else 2) * max(shape.intermediate_sizes)
    return batch * tokens * (2 * width + max(attn, mlp)) * _act_bytes(dtype) + batch * shape.vocab_size * 4


def phase_flops(shape: ModelShape, layout: Layout, params: dict, batch: int, new: int, past: int) -> float:
    """FLOPs of one forward over `new` tokens per sequence with `past` tokens cached."""
    pairs = new * past + new * (new + 1) / 2  # (query, key) pairs under the causal mask
    attn = sum(2 * batch * shape.num_heads * (q + v) * pairs for q, v in zip(shape.qk_head_dims, shape.v_head_dims))
    head = 2 * batch * shape.vocab_size * (shape.embed_proj or layout.widths[-1])
    return 2 * batch * new * params["matmul_body"] + head + attn


def weight_read_bytes(params: dict, layout: Layout, dtype: str) -> int:
    """Weights one forward reads: all but the lookup tables (a tied table is read whole as the head)."""
    lookup = params["positions"] + (0 if layout.tied else params["embedding"])
    return math.ceil((params["total"] - lookup) * WEIGHT_BYTES[dtype])


def phase_bytes(shape, layout, params, dtype, batch: int, new: int, past: int, phase: str) -> int:
    """Bytes one forward moves: weights + KV read (`past` tokens) + KV written (prefill only; a decode
    step's own K/V row is left out as negligible)."""
    written = new if phase == "prefill" else 0
    return weight_read_bytes(params, layout, dtype) + kv_cache_bytes(shape, batch, past + written, dtype)


# --- plan ---------------------------------------------------------------------------------------


@dataclass
class Efficiency:
    """Achieved fraction of peak: predicted time = ideal time / efficiency. 1.0 = the pure bound."""

    compute: float = 1.0
    bandwidth: float = 1.0
    gpu: str | None = None  # where it was measured
    prefill_samples: int = 0
    decode_samples: int = 0
    source: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Variant:
    """One model variant (dense or sliced) independent of the GPU."""

    name: str
    residual_width: int
    head_width: int
    params: dict[str, int]
    weight_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    prefill_flops: float
    prefill_bytes: int
    decode_flops: float
    decode_bytes: int

    @property
    def resident_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes


@dataclass
class Estimate:
    """One variant on one GPU type."""

    need_bytes: int  # on a single GPU, overhead included
    fits: bool
    n_gpus: int
    prefill_ms: float
    prefill_bound: str  # "compute" | "memory"
    prefill_tokens_per_s: float
    decode_ms: float
    decode_bound: str
    decode_tokens_per_s: float


@dataclass
class Plan:
    model: dict
    settings: dict
    variants: dict[str, Variant | None]
    gpus: list[dict]  # {"gpu": spec dict, "dense": Estimate, "sliced": Estimate | None, "ratios": {...}}
    calibration: Efficiency | None = None
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def conv(value):
            if hasattr(value, "__dataclass_fields__"):
                return {k: conv(v) for k, v in asdict(value).items()}
            if isinstance(value, dict):
                return {k: conv(v) for k, v in value.items()}
            if isinstance(value, list):
                return [conv(v) for v in value]
            return value

        dense, sliced = self.variants.get("dense"), self.variants.get("sliced")
        return {
            "schema": SCHEMA,
            "model": self.model,
            "settings": self.settings,
            "calibration": conv(self.calibration),
            "variants": {"dense": conv(dense), "sliced": conv(sliced)},
            "ratios": _variant_ratios(dense, sliced),
            "gpus": conv(self.gpus),
            "assumptions": list(self.assumptions),
        }


def _ratio(new, old) -> float | None:
    return None if new is None or old in (None, 0) else new / old


def _variant_ratios(dense: Variant | None, sliced: Variant | None) -> dict:
    if dense is None or sliced is None:
        return {"params": None, "weight_bytes": None, "decode_bytes": None, "prefill_flops": None}
    return {"params": _ratio(sliced.params["total"], dense.params["total"]),
            "weight_bytes": _ratio(sliced.weight_bytes, dense.weight_bytes),
            "decode_bytes": _ratio(sliced.decode_bytes, dense.decode_bytes),
            "prefill_flops": _ratio(sliced.prefill_flops, dense.prefill_flops)}


def make_variant(name: str, shape: ModelShape, layout: Layout, dtype: str, batch: int, context: int) -> Variant:
    params = count_params(shape, layout)
    return Variant(
        name=name, residual_width=max(layout.widths[:-1]), head_width=layout.widths[-1], params=params,
        weight_bytes=math.ceil(params["total"] * WEIGHT_BYTES[dtype]),
        kv_cache_bytes=kv_cache_bytes(shape, batch, context, dtype),
        workspace_bytes=workspace_bytes(shape, layout, batch, context, dtype),
        prefill_flops=phase_flops(shape, layout, params, batch, context, 0),
        prefill_bytes=phase_bytes(shape, layout, params, dtype, batch, context, 0, "prefill"),
        decode_flops=phase_flops(shape, layout, params, batch, 1, context),
        decode_bytes=phase_bytes(shape, layout, params, dtype, batch, 1, context, "decode"),
    )


def bound_seconds(flops: float, nbytes: float, gpu: GPUSpec, dtype: str, n_gpus: int = 1,
                  eff: Efficiency | None = None) -> tuple[float, str]:
    """max(compute time, memory time) on n GPUs with ideal tensor parallelism, and which one binds."""
    eff = eff or Efficiency()
    compute = flops / (n_gpus * gpu.peak_flops(dtype) * eff.compute)
    memory = nbytes / (n_gpus * gpu.bandwidth * eff.bandwidth)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def gpus_needed(resident_bytes: int, gpu: GPUSpec) -> int:
    per_gpu = USABLE_FRACTION * gpu.memory_bytes - OVERHEAD_BYTES
    return max(1, math.ceil(resident_bytes / per_gpu))


def estimate(variant: Variant, gpu: GPUSpec, dtype: str, batch: int, context: int,
             eff: Efficiency | None = None) -> Estimate:
    need = variant.resident_bytes + OVERHEAD_BYTES
    n = gpus_needed(variant.resident_bytes, gpu)
    prefill, prefill_bound = bound_seconds(variant.prefill_flops, variant.prefill_bytes, gpu, dtype, n, eff)
    decode, decode_bound = bound_seconds(variant.decode_flops, variant.decode_bytes, gpu, dtype, n, eff)
    return Estimate(need_bytes=need, fits=need <= USABLE_FRACTION * gpu.memory_bytes, n_gpus=n,
                    prefill_ms=prefill * 1e3, prefill_bound=prefill_bound,
                    prefill_tokens_per_s=batch * context / prefill,
                    decode_ms=decode * 1e3, decode_bound=decode_bound, decode_tokens_per_s=batch / decode)


ASSUMPTIONS = [
    f"usable memory = {USABLE_FRACTION:.0%} of nominal; {OVERHEAD_BYTES / GiB:.0f} GiB per GPU for the CUDA "
    "context, library workspaces and allocator slack",
    "KV cache sized for the full context at batch B, in fp16/bf16 (fp32 for fp32); SliceGPT does not shrink it",
    "workspace = B·T·(2·D + max(attention projections, k·I))·a + B·V·4: one layer's activations in a prefill "
    "of T = context tokens (SDPA/flash attention, no T×T scores) plus fp32 logits of the last position",
    "times are lower bounds: max(FLOPs / peak, bytes / bandwidth) on the #GPUs shown with ideal tensor "
    "parallelism (no communication); pipeline parallelism would not divide per-token latency",
    "prefill = one forward over the whole context (logits for the last position only); decode = one token "
    "with the context cached, reading every weight but the lookup tables plus the whole KV cache",
    "int8/int4 = weight-only quantisation (matmuls in fp16); scales and zero points not counted",
    "peaks: dense fp16/bf16 tensor-core FLOP/s with fp32 accumulation (no sparsity), datasheet bandwidth",
]


def plan(config: Any, slice: float = 0.3, gpus: str | Iterable[str] | None = "all", batch: int = 1,
         context: int = 4096, dtype: str = "fp16", slice_head: bool = False,
         efficiency: Efficiency | None = None) -> Plan:
    """Dense vs SliceGPT-sliced memory fit and speed bounds on each GPU. For a config that is already
    sliced (model_type sliced_decoder), only the `sliced` variant is filled, as saved."""
    check_slice(slice)
    dtype = normalise_dtype(dtype)
    if int(batch) < 1 or int(context) < 1:
        raise InvalidOptionError(f"--batch and --context must be >= 1, got {batch} and {context}")
    batch, context = int(batch), int(context)
    specs = select_gpus(gpus)
    shape = model_shape(config)
    if shape.is_sliced:
        dense, sliced = None, make_variant("sliced", shape, dense_layout(shape), dtype, batch, context)
    else:
        dense = make_variant("dense", shape, dense_layout(shape), dtype, batch, context)
        sliced = make_variant("sliced", shape, sliced_layout(shape, slice, slice_head), dtype, batch, context)
    rows = []
    for gpu in specs:
        row = {"gpu": gpu.as_dict(), "dense": None, "sliced": None}
        for variant in (dense, sliced):
            if variant is not None:
                row[variant.name] = estimate(variant, gpu, dtype, batch, context, efficiency)
        d, s = row["dense"], row["sliced"]
        row["ratios"] = {"n_gpus": _ratio(s and s.n_gpus, d and d.n_gpus),
                         "prefill_ms": _ratio(s and s.prefill_ms, d and d.prefill_ms),
                         "decode_ms": _ratio(s and s.decode_ms, d and d.decode_ms)}
        rows.append(row)
    model = {"name": shape.name, "arch": shape.arch, "hidden_size": shape.hidden_size,
             "num_layers": shape.num_layers, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
             "head_dim": shape.qk_head_dims[0], "intermediate_size": max(shape.intermediate_sizes),
             "vocab_size": shape.vocab_size, "gated_mlp": shape.gated_mlp, "parallel_block": shape.parallel_block,
             "tied_embeddings": shape.tied_embeddings, "already_sliced": shape.is_sliced}
    settings = {"slice": None if shape.is_sliced else slice, "slice_head": slice_head, "dtype": dtype,
                "batch": batch, "context": context, "usable_fraction": USABLE_FRACTION,
                "overhead_bytes": OVERHEAD_BYTES}
    return Plan(model=model, settings=settings, variants={"dense": dense, "sliced": sliced}, gpus=rows,
                calibration=efficiency, assumptions=list(ASSUMPTIONS))


# --- calibration --------------------------------------------------------------------------------


def fit_efficiency(bench: str | os.PathLike | Mapping) -> Efficiency:
    """Fit compute and bandwidth efficiency (ideal time / measured time, i.e. achieved fraction of
    peak) from a bench JSON, so `plan(..., efficiency=...)` predicts ideal / efficiency.

    Bench JSON schema (written by the bench harness; a path or an already-loaded dict)::

        {
          "gpu": "h100-80gb",            # a GPU_SPECS name/alias, torch.cuda.get_device_name() text,
                                         # or a dict {name, memory_bytes, bandwidth, fp16_flops, fp32_flops}
          "dtype": "fp16",               # default for results (fp32|fp16|bf16|int8|int4)
          "n_gpus": 1,                   # optional, default 1 (tensor parallel)
          "results": [
            {"phase": "prefill",         # one forward over `tokens` new tokens per sequence
             "measured_ms": 41.0,        # wall time of the whole measured call (median of repeats)
             "batch": 1,
             "tokens": 2048,             # prefill: prompt tokens; decode: number of decode steps timed
             "context": 0,               # tokens already cached before the first timed step
             "dtype": "fp16",            # optional override
             "model": {...},             # config.json dict (HF or sliced_decoder), a --model name, or
                                         # {"params": N, "weight_bytes": optional,
                                         #  "kv_bytes_per_token": optional (per sequence),
                                         #  "flops_per_token": optional (default 2·params)}
             "slice": 0.3,               # optional: apply SliceGPT (fraction) to an HF config
             "slice_head": false},       # optional
            {"phase": "decode", "measured_ms": 1234.0, "batch": 1, "tokens": 128, "context": 2048,
             "model": {...}}
          ]
        }

    Prefill results fit the compute factor (against FLOPs / peak), decode results the bandwidth factor
    (against bytes / bandwidth); each factor is the geometric mean over its results, 1.0 if none.
    Decode ideal time sums every timed step (cache growing from `context` to `context + tokens − 1`).
    """
    source = None
    if not isinstance(bench, Mapping):
        source = str(bench)
        try:
            bench = json.loads(Path(bench).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ArtifactError(
                f"bench file {source} does not exist; run `toolchain bench` first or fix the path") from err
        except (ValueError, UnicodeDecodeError, IsADirectoryError) as err:
            raise ArtifactError(f"bench file {source} is not valid JSON ({err}); re-run the benchmark") from err
    if not isinstance(bench, Mapping) or not isinstance(bench.get("results"), list) or "gpu" not in bench:
        raise ArtifactError(f"bench JSON {source or ''} needs a 'gpu' and a 'results' list (see fit_efficiency)")
    if bench["gpu"] is None:
        raise ArtifactError(f"bench JSON {source or ''} was measured without a GPU (provider "
                            f"{bench.get('provider', 'cpu')}); the planner calibrates GPU efficiency, so run "
                            "`toolchain bench BUILD --provider cuda` on the GPU you plan for")
    gpu = get_gpu(bench["gpu"])
    n_gpus = int(bench.get("n_gpus", 1))
    compute, bandwidth = [], []
    for i, result in enumerate(bench["results"]):
        try:
            phase = result["phase"]
            measured = float(result["measured_ms"]) / 1e3
            batch, tokens = int(result.get("batch", 1)), int(result["tokens"])
            context = int(result.get("context", 0))
            dtype = normalise_dtype(result.get("dtype", bench.get("dtype", "fp16")))
            model = result["model"]
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"bench result #{i} lacks or mangles {err}; each needs phase, measured_ms, "
                                "tokens, model (see fit_efficiency)") from err
        if phase not in ("prefill", "decode") or measured <= 0 or tokens < 1:
            raise ArtifactError(f"bench result #{i}: phase must be prefill|decode with measured_ms > 0 and tokens >= 1")
        cost = _result_cost(model, result, dtype, batch, tokens, context, phase)
        if phase == "prefill":
            flops, _ = cost[0]
            compute.append(flops / (n_gpus * gpu.peak_flops(dtype)) / measured)
        else:
            ideal = sum(nbytes for _, nbytes in cost) / (n_gpus * gpu.bandwidth)
            bandwidth.append(ideal / measured)

    def geomean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0

    return Efficiency(compute=geomean(compute), bandwidth=geomean(bandwidth), gpu=gpu.name,
                      prefill_samples=len(compute), decode_samples=len(bandwidth), source=source)


def _result_cost(model, result, dtype, batch, tokens, context, phase) -> list[tuple[float, float]]:
    """(flops, bytes) per forward: one for prefill, one per decode step."""
    steps = [(tokens, context)] if phase == "prefill" else [(1, context + i) for i in range(tokens)]
    if isinstance(model, Mapping) and "params" in model and "model_type" not in model:
        params = int(model["params"])
        weights = float(model.get("weight_bytes", params * WEIGHT_BYTES[dtype]))
        kv_token = float(model.get("kv_bytes_per_token", 0))
        flops_token = float(model.get("flops_per_token", 2 * params))
        written = tokens if phase == "prefill" else 0
        return [(flops_token * batch * new, weights + kv_token * batch * (past + written)) for new, past in steps]
    shape = model_shape(model)
    fraction = result.get("slice")
    layout = (sliced_layout(shape, float(fraction), bool(result.get("slice_head", False)))
              if fraction is not None and not shape.is_sliced else dense_layout(shape))
    params = count_params(shape, layout)
    return [(phase_flops(shape, layout, params, batch, new, past),
             phase_bytes(shape, layout, params, dtype, batch, new, past, phase)) for new, past in steps]


# --- rendering ----------------------------------------------------------------------------------


def _gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if value < 1e4 else f"{value:,.0f}"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def summary_line(data: dict) -> str:
    """One sentence: the model, dense vs sliced parameters, settings."""
    m, s, v = data["model"], data["settings"], data["variants"]
    dense, sliced = v["dense"], v["sliced"]
    head = f"{m['name']} ({m['arch']})"
    if dense is None:
        body = (f"already sliced: {fmt_params(sliced['params']['total'])} params "
                f"(widths up to {sliced['residual_width']})")
    else:
        ratio = data["ratios"]["params"]
        body = (f"{fmt_params(dense['params']['total'])} params dense -> {fmt_params(sliced['params']['total'])} "
                f"sliced at {s['slice']:.0%} (d={sliced['residual_width']} of {m['hidden_size']}, "
                f"head {sliced['head_width']}; x{ratio:.3f} incl. shortcuts and embeddings)")
    return f"{head}: {body}; {s['dtype']}, batch {s['batch']}, context {s['context']}"


def table_rows(data: dict) -> list[list[str]]:
    """Rows shared by the Markdown and the CLI table."""
    rows = []
    for row in data["gpus"]:
        for name in ("dense", "sliced"):
            est, var = row[name], data["variants"][name]
            if est is None:
                continue
            label = name if name == "dense" or data["settings"]["slice"] is None else \
                f"sliced {data['settings']['slice']:.0%}"
            rows.append([row["gpu"]["name"], label, _gib(var["weight_bytes"]), _gib(est["need_bytes"]),
                         "yes" if est["fits"] else "no", str(est["n_gpus"]),
                         f"{_num(est['prefill_ms'])} ({est['prefill_bound'][0]})",
                         f"{_num(est['decode_ms'], 2)} ({est['decode_bound'][0]})",
                         _num(est["decode_tokens_per_s"])])
    return rows


TABLE_HEADER = ["GPU", "model", "weights GiB", "need GiB", "fits 1 GPU", "#GPUs", "prefill ms",
                "decode ms/tok", "tok/s"]


def render_markdown(plan_or_dict: Plan | dict) -> str:
    data = plan_or_dict.to_dict() if isinstance(plan_or_dict, Plan) else plan_or_dict
    lines = ["# Plan: will it fit, how fast at best", "", summary_line(data), ""]
    cal = data["calibration"]
    if cal:
        lines += [f"Calibrated on {cal['gpu']}: compute efficiency {cal['compute']:.2f} "
                  f"({cal['prefill_samples']} prefill runs), bandwidth efficiency {cal['bandwidth']:.2f} "
                  f"({cal['decode_samples']} decode runs), applied to every GPU below.", ""]
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(data)]
    lines += ["", "(c) compute-bound, (m) memory-bandwidth-bound. #GPUs: memory-driven count; the times assume "
              "that many GPUs with ideal tensor parallelism.", "", "## Parameters", "",
              "| group | dense | sliced |", "|---|---|---|"]
    dense, sliced = data["variants"]["dense"], data["variants"]["sliced"]
    for group in ("embedding", "positions", "attention", "mlp", "norms", "shortcuts", "lm_head", "total"):
        cells = [f"{v['params'][group]:,}" if v else "-" for v in (dense, sliced)]
        lines.append(f"| {group} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Assumptions", ""] + [f"- {a}" for a in data["assumptions"]]
    lines += ["", "## GPU specs", ""] + [f"- {row['gpu']['name']}: {row['gpu']['source']}" for row in data["gpus"]]
    return "\n".join(lines) + "\n"
