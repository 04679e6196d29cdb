"""Resolve `--model` to a local Hugging Face checkpoint directory, and load it safely.

Accepted specs, tried in this order:
  1. a short name from SHORT_NAMES (`phi-2`, `smollm2-135m`, ...), mapped to a hub id or a local file;
  2. an existing path: an HF checkpoint dir (config.json + *.safetensors), a `.gguf` file, or a dir
     holding exactly one `.gguf`;
  3. a hub id (`owner/name`), fetched through the normal HF cache (offline when cached).

GGUF files are dequantised once into an ordinary checkpoint dir under the cache (see `cache_root`),
so every later stage only ever sees config.json + model.safetensors. Pickle-based weights are refused,
never unpickled, and remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from toolchain.core.errors import (
    ArtifactError,
    ModelNotFoundError,
    UnsafeWeightsError,
    UnsupportedArchitectureError,
)
from toolchain.core.fileio import atomic_dir, sha256_file, write_json

# Sentinel for short names served by a wheel-shipped file instead of the hub.
_LOCAL_SMOLLM2 = "local:smollm2-135m"

SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": _LOCAL_SMOLLM2,
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "phi-2": "microsoft/phi-2",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files worth fetching from a hub repo: never pickles, never the duplicate "original/" weights.
HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_IGNORE = ["original/*", "consolidated*", "*.pt", "*.bin", "*.pth"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CONVERTED_MARK = "toolchain_source.json"

Kind = Literal["hub", "dir", "gguf"]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local HF checkpoint dir (config.json + safetensors + tokenizer files)
    source: str  # what the user typed
    kind: Kind


def cache_root() -> Path:
    """Where converted GGUF checkpoints live: $TOOLCHAIN_CACHE or ~/.cache/toolchain."""
    env = os.environ.get("TOOLCHAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "toolchain"


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a --model value into a validated local checkpoint dir (converting/downloading if needed)."""
    spec = str(spec).strip()
    if not spec:
        raise ModelNotFoundError("--model is empty; pass a short name (e.g. smollm2-135m), a local dir or a hub id")
    target = SHORT_NAMES.get(spec.lower(), spec)
    if target == _LOCAL_SMOLLM2:
        from toolchain.data.assets import smollm2_gguf_path

        return ResolvedModel(convert_gguf(smollm2_gguf_path()), spec, "gguf")

    path = Path(target).expanduser()
    if path.exists():
        return _resolve_path(path, spec)
    if _looks_like_path(target):
        raise ModelNotFoundError(
            f"{target} does not exist; check the path, or pass a hub id (owner/name) or a short name "
            f"({', '.join(sorted(SHORT_NAMES))})"
        )
    return ResolvedModel(_hub_snapshot(target), spec, "hub")


def _looks_like_path(text: str) -> bool:
    return (
        not _HUB_ID.match(text)
        or text.startswith((".", "~"))
        or text.endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))
    )


def _resolve_path(path: Path, spec: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(convert_gguf(path), spec, "gguf")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeWeightsError(_pickle_message(path))
        raise ModelNotFoundError(
            f"{path} is a file, not a model; pass the checkpoint directory (with config.json) or a .gguf file"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(convert_gguf(ggufs[0]), spec, "gguf")
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelNotFoundError(f"{path} holds several GGUF files ({names}); pass the one you want as --model")
    check_checkpoint_dir(path)
    return ResolvedModel(path, spec, "dir")


def _pickle_message(where: Path) -> str:
    return (
        f"{where} holds only pickle-based weights (.bin/.pt/.pth/.ckpt), which can run arbitrary code when "
        "loaded, so they are never opened. Convert them to safetensors on a machine where you trust the file, "
        "e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` "
        "(writes model.safetensors), then pass new_dir"
    )


def check_checkpoint_dir(path: Path) -> dict[str, tuple[int, ...]]:
    """Validate an HF checkpoint dir without loading tensors; return {tensor name: shape}."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint; pass the directory that "
            "contains config.json, a .gguf file, or a hub id"
        )
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{config_file} is not valid JSON ({err}); re-download or re-save the checkpoint") from err

    shards = _safetensors_shards(path)
    shapes: dict[str, tuple[int, ...]] = {}
    from safetensors import SafetensorError, safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise UnsafeWeightsError(
                f"{shard} is corrupted or truncated ({err}); re-download it or re-save the model"
            ) from err
    return shapes


def _safetensors_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{index} is unreadable ({err}); re-download or re-save the checkpoint") from err
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ArtifactError(
                f"{path} is missing shard(s) {', '.join(missing)} listed in {index.name}; "
                "finish the download or re-save"
            )
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir()):
        raise UnsafeWeightsError(_pickle_message(path))
    raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors weights; copy the weights in or re-save")


# --- hub ----------------------------------------------------------------------------------------


def _offline() -> bool:
    # Read the environment at call time: huggingface_hub freezes its constant at import.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _hub_snapshot(repo_id: str) -> Path:
    import huggingface_hub as hub
    from huggingface_hub import errors as hub_errors

    not_cached = (
        f"{repo_id} is not a local path and is not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE})"
    )
    fix = (
        f"download it on a machine with internet (`hf download {repo_id}`) and copy the cache over, "
        "or pass a local checkpoint dir"
    )
    offline = _offline()
    try:
        folder = hub.snapshot_download(
            repo_id, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE, local_files_only=offline
        )
    except hub_errors.GatedRepoError as err:
        raise ModelNotFoundError(
            f"{repo_id} is gated; accept its licence on huggingface.co and log in (`hf auth login`), then retry"
        ) from err
    except hub_errors.RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"{repo_id} is not a local path, a short name ({', '.join(sorted(SHORT_NAMES))}) "
            "or an existing hub repo; check the spelling"
        ) from err
    except (hub_errors.LocalEntryNotFoundError, OSError) as err:
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the hub cannot be reached (no network)"
        raise ModelNotFoundError(f"{not_cached}, and {why}; {fix}") from err
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{not_cached} completely (no config.json in {path}); {fix}")
    check_checkpoint_dir(path)
    return path


# --- GGUF -----------------------------------------------------------------------------------------


def convert_gguf(gguf_path: Path, root: Path | None = None) -> Path:
    """Dequantise a GGUF file into a cached HF checkpoint dir (reused when already converted)."""
    gguf_path = Path(gguf_path)
    digest = sha256_file(gguf_path)
    dest = (root or cache_root()) / "gguf" / digest[:16]
    if (dest / _CONVERTED_MARK).is_file():  # written last inside the atomic dir, so dest is complete
        return dest
    model, tokenizer = _load_gguf(gguf_path)
    with atomic_dir(dest, overwrite=True) as tmp:
        plain = _plain_copy(model)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / _CONVERTED_MARK, {"gguf_file": gguf_path.name, "sha256": digest})
    return dest


def _load_gguf(gguf_path: Path):
    try:
        import gguf  # noqa: F401  (transformers needs it to parse the file)
    except ImportError as err:
        raise ModelNotFoundError("reading .gguf files needs the gguf package; pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype="float32")
    except ValueError as err:
        if "not supported" in str(err) or "architecture" in str(err):
            raise UnsupportedArchitectureError(
                f"{gguf_path} uses an architecture transformers cannot read from GGUF ({err}); "
                "use the original safetensors checkpoint instead"
            ) from err
        raise ArtifactError(f"cannot read {gguf_path} ({err}); re-download the file") from err
    except (OSError, KeyError, IndexError, EOFError, struct.error) as err:
        raise ArtifactError(f"cannot read {gguf_path} ({err}); the file is probably truncated, re-download it") from err
    return model, tokenizer


def _plain_copy(model):
    """The GGUF-loaded model refuses save_pretrained; move its weights into an unquantised twin."""
    import torch

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):  # skip random init: every weight is overwritten below
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


# --- loading --------------------------------------------------------------------------------------


def load_hf_config(resolved: ResolvedModel):
    """The checkpoint's HF config, after checking the weights' headers and shapes (no tensor is read)."""
    from transformers import AutoConfig

    import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)

    path = resolved.path
    shapes = check_checkpoint_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"{path}: transformers does not know this model type ({err}); models that need "
            "trust_remote_code are not supported, upgrade transformers or use a supported architecture"
        ) from err
    _check_shapes(path, config, shapes)
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{path} has no usable tokenizer files ({err}); copy them from the source model"
        ) from err


def _incomplete(path: Path, missing) -> ArtifactError:
    return ArtifactError(
        f"{path} lacks {len(missing)} weight(s) its config expects (e.g. {', '.join(sorted(missing)[:3])}); "
        "the checkpoint is incomplete, re-download or re-save it"
    )


def hf_skeleton(config):
    """The HF model of `config` on the meta device: its class, parameter names and counts, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as err:
        raise UnsupportedArchitectureError(
            f"{config.model_type} is not a causal LM transformers can build here ({err})"
        ) from err


def check_complete(path: Path, skeleton, names) -> None:
    """Every parameter the HF model of this config owns is in the checkpoint (tied copies aside)."""
    seen, missing = set(), []
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name not in names:
            missing.append(name)
    if missing:
        raise _incomplete(path, missing)


def load_hf_model(resolved: ResolvedModel, dtype=None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a resolved checkpoint; safetensors only, no remote code."""
    model = load_hf_weights(resolved, dtype, device)
    return model, load_tokenizer(resolved.path)


def load_hf_weights(resolved: ResolvedModel, dtype=None, device: str = "cpu"):
    """The causal LM of a resolved checkpoint (any supported HF architecture, or a saved canonical
    model), in eval mode; headers, shapes and completeness are checked first. No tokenizer needed."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    path = resolved.path
    config = load_hf_config(resolved)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True,
        )
    except ValueError as err:
        raise UnsupportedArchitectureError(
            f"{path} ({config.model_type}) is not a causal LM transformers can build here ({err})"
        ) from err
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ArtifactError(
            f"{path}: tensor shapes disagree with config.json (see the load report above); the config does not "
            "belong to these weights, restore the matching config.json"
        ) from err
    except (OSError, KeyError) as err:
        raise ArtifactError(f"{path} could not be loaded as a causal LM ({err}); re-save the model or pass a "
                            "directory written by `toolchain build`/`save_pretrained`") from err
    missing = [k for k in info.get("missing_keys", ()) if k]
    if missing:
        raise _incomplete(path, missing)
    return model.to(device).eval()


def _check_shapes(path: Path, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare checkpoint tensor shapes with what the config builds, before any weight is read."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001  (unbuildable configs get their own error at load time)
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    bad = [(k, shapes[k], expected[k]) for k in shapes if k in expected and shapes[k] != expected[k]]
    if bad:
        listing = "; ".join(f"{k}: file {list(a)} vs config {list(b)}" for k, a, b in bad[:3])
        raise ArtifactError(
            f"{path}: {len(bad)} tensor shape(s) disagree with config.json ({listing}); the config does not "
            "belong to these weights, restore the matching config.json"
        )
