"""Writing genai_config.json (+ tokenizer files) beside an exported graph, so
`onnxruntime_genai.Model(dir)` loads it; `export_genai` makes a self-contained genai model dir."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from toolchain.core.build_dirs import model_dir
from toolchain.core.errors import ArtifactError, InvalidOptionError
from toolchain.core.fileio import atomic_dir, atomic_file, write_json
from toolchain.core.iospec import GENAI_INPUT_NAMES, GENAI_OUTPUT_NAMES
from toolchain.core.tokenizer_files import TOKENIZER_FILES, copy_tokenizer_files, portable_tokenizer_config

from exporters.genai.kv_padding import kv_dims, pad_kv_io
from exporters.genai.validate import GENAI_CONFIG, appends_in_place, validate_genai_config
from exporters.hf_config import canonical_config_path
from exporters.onnx import MODEL_FILE

PADDED_MODEL_FILE = "model.genai.onnx"
# HF architecture of the source model → onnxruntime-genai model.type (all decoder-only in genai).
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "OPTForCausalLM": "decoder",
}
GENERIC_TYPE = "decoder"
PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}], "dml": [{"dml": {}}]}
ESSENTIAL_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class GenaiResult:
    out_dir: Path
    config_path: Path
    model_file: str  # the graph genai loads (model.onnx, or model.genai.onnx when KV dims were padded)
    model_type: str
    head_size: int
    padded_layers: list[int]  # layers whose KV tensors were zero-padded to head_size
    tokenizer_files: list[str]
    config: dict = field(repr=False, default_factory=dict)


def write_genai_config(onnx_dir: str | Path, *, tokenizer=None, model_type: str | None = None,
                       max_length: int | None = None, provider: str = "cpu",
                       require_tokenizer: bool = True) -> GenaiResult:
    """Write genai_config.json into the export dir `onnx_dir` (in place) and make sure the tokenizer
    files are there.

    tokenizer: a dir holding tokenizer files, a hub id, or a transformers tokenizer object; by default
    the files already in `onnx_dir` (exports copy them from their source), else the source model's dir.
    model_type: genai's model.type (default: from the source architecture, see MODEL_TYPES).
    max_length: default search.max_length (prompt + new tokens); default: the model's context length.
    provider: cpu | cuda | dml (genai's session provider). Returns what was written; the written
    config is validated against the graph (GenaiConfigError on mismatch).
    """
    onnx_dir = export_dir(onnx_dir)
    if provider not in PROVIDERS:
        raise InvalidOptionError(f"unknown genai provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    export_config = _read_json(onnx_dir / "export_config.json", "export_config.json")
    model_config = _read_json(canonical_config_path(onnx_dir), "the canonical config")
    generation = _read_optional_json(onnx_dir / "generation_config.json")
    model_file = export_config.get("model_file", MODEL_FILE)
    graph = onnx.load(str(onnx_dir / model_file), load_external_data=False)
    kv = kv_dims(graph)
    if not kv:
        raise ArtifactError(f"{onnx_dir / model_file} has no {GENAI_INPUT_NAMES['past_key_names']} inputs; export it with "
                            "`toolchain export` (KV-cache graph with genai I/O names)")
    heads = {h for layer in kv for h, _ in layer}
    if len(heads) != 1:
        raise ArtifactError(f"{onnx_dir / model_file}: KV head counts differ across layers ({sorted(heads)}); "
                            "onnxruntime-genai needs one num_key_value_heads for every layer")
    head_size = max(d for layer in kv for _, d in layer)
    padded = [i for i, layer in enumerate(kv) if any(d != head_size for _, d in layer)]
    genai_file = model_file
    if padded:
        pad_kv_io(onnx_dir / model_file, onnx_dir / PADDED_MODEL_FILE, head_size)
        genai_file = PADDED_MODEL_FILE
    tokenizer_files = ensure_tokenizer(onnx_dir, tokenizer, export_config, required=require_tokenizer)
    share_buffer = appends_in_place(graph, len(kv))

    model_type = model_type or genai_model_type(model_config)
    context = int(model_config.get("max_position_embeddings") or 0) or int(max_length or 0) or 2048
    max_length = int(max_length or context)
    vocab = int(export_config.get("vocab_size") or model_config["vocab_size"])
    eos = _eos_ids(generation, model_config, onnx_dir if tokenizer_files else None)
    bos = _first_int(generation.get("bos_token_id"), model_config.get("bos_token_id"), eos[0])
    pad = _first_int(generation.get("pad_token_id"), model_config.get("pad_token_id"), eos[0])
    widths = model_config.get("residual_widths") or [model_config.get("hidden_size")]
    config = {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": PROVIDERS[provider]},
                "filename": genai_file,
                "head_size": head_size,
                # the residual width the embeddings produce (genai reads it only for embedding I/O,
                # which our single-graph decoder does not expose)
                "hidden_size": int(widths[0]),
                "inputs": dict(GENAI_INPUT_NAMES),
                "outputs": dict(GENAI_OUTPUT_NAMES),
                "num_attention_heads": int(model_config.get("num_attention_heads") or export_config["num_attention_heads"]),
                "num_hidden_layers": len(kv),
                "num_key_value_heads": heads.pop(),
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": _search_options(generation, max_length, share_buffer),
    }
    path = onnx_dir / GENAI_CONFIG
    with atomic_file(path) as tmp:
        write_json(tmp, config)
    validate_genai_config(onnx_dir)
    return GenaiResult(onnx_dir, path, genai_file, model_type, head_size, padded, tokenizer_files, config)


def export_genai(onnx_dir: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs) -> GenaiResult:
    """A self-contained onnxruntime-genai model dir at `out`: the export's files (hard-linked when on
    the same filesystem) plus genai_config.json and tokenizer files. `kwargs` go to write_genai_config.
    This is what `toolchain deploy --genai` and `toolchain build --deploy genai` write."""
    source = export_dir(onnx_dir)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in (GENAI_CONFIG, PADDED_MODEL_FILE) and not path.name.startswith("."):
                # graph and weights are never rewritten in place: share them; small files may be (tokenizer)
                link = path.name.startswith(MODEL_FILE)
                _link_or_copy(path, tmp / path.name) if link else shutil.copyfile(path, tmp / path.name)
        result = write_genai_config(tmp, **kwargs)
    result.out_dir, result.config_path = out, out / GENAI_CONFIG
    return result


def _search_options(generation: dict, max_length: int, share_buffer: bool = False) -> dict:
    """genai's defaults for generate(): the model's generation_config.json where it says (as HF
    generate would), else greedy; a shared KV buffer where the graph supports it (module doc)."""
    def number(key, default, kind=float):
        value = generation.get(key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    return {
        "diversity_penalty": 0.0, "do_sample": bool(generation.get("do_sample", False)), "early_stopping": True,
        "length_penalty": 1.0, "max_length": max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
        "repetition_penalty": number("repetition_penalty", 1.0), "temperature": number("temperature", 1.0),
        "top_k": number("top_k", 50, int), "top_p": number("top_p", 1.0),
    }


def genai_model_type(model_config: dict) -> str:
    """genai's model.type for a saved (sliced) model's config.json."""
    for arch in (model_config.get("source_architecture"), *(model_config.get("architectures") or [])):
        if arch in MODEL_TYPES:
            return MODEL_TYPES[arch]
    return GENERIC_TYPE


def ensure_tokenizer(onnx_dir: Path, tokenizer, export_config: dict, required: bool = True) -> list[str]:
    """Tokenizer files in `onnx_dir` (genai's Tokenizer reads tokenizer.json + tokenizer_config.json)."""
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(onnx_dir))
        else:
            source = Path(str(tokenizer)).expanduser()
            if source.is_dir():
                copy_tokenizer_files(source, onnx_dir, overwrite=False)
            else:  # a hub id (offline when cached)
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(onnx_dir))
    elif not _has_tokenizer(onnx_dir):
        source = Path(str(export_config.get("source_model") or "")).expanduser()
        for candidate in (source, model_dir(source)):
            if str(source) and candidate.is_dir() and _has_tokenizer(candidate):
                copy_tokenizer_files(candidate, onnx_dir, overwrite=False)
                break
    if required and not _has_tokenizer(onnx_dir):
        raise ArtifactError(f"{onnx_dir} has no tokenizer files ({', '.join(ESSENTIAL_TOKENIZER_FILES)}) and the "
                            "source model's dir has none either; pass the tokenizer (--tokenizer DIR_OR_HUB_ID, or "
                            "tokenizer= in the API)")
    portable_tokenizer_config(onnx_dir)  # a tokenizer saved by transformers 5 may name a class 4.x lacks
    return sorted(name for name in TOKENIZER_FILES if (onnx_dir / name).is_file())


def export_dir(path: str | Path) -> Path:
    """An export dir, or a build dir (its onnx/, or quantized/ when present is not guessed: pass it)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        path = path.parent
    if not (path / "export_config.json").is_file() and (path / "onnx" / "export_config.json").is_file():
        path = path / "onnx"
    if not (path / "export_config.json").is_file():
        raise ArtifactError(f"{path} is not an ONNX export (no export_config.json); export the model first "
                            "(`toolchain export ... --out DIR`) or pass a build dir")
    return path


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the export dir is incomplete: re-export the model")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} ({what}) is corrupted ({err}); re-export the model") from None


def _read_optional_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _eos_ids(generation: dict, model_config: dict, tokenizer_dir: Path | None) -> list[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer's eos_token."""
    for value in (generation.get("eos_token_id"), model_config.get("eos_token_id")):
        ids = value if isinstance(value, list) else [value]
        ids = [int(t) for t in ids if isinstance(t, int) and not isinstance(t, bool)]
        if ids:
            return ids
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(str(tokenizer_dir)).eos_token_id
        if isinstance(eos, int):
            return [eos]
    raise ArtifactError("the model has no eos_token_id (config.json, generation_config.json or the tokenizer); "
                        "onnxruntime-genai needs one to stop generating: add eos_token_id to config.json")


def _first_int(*values) -> int:
    return next(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))


def _has_tokenizer(path: Path) -> bool:
    return all((path / name).is_file() for name in ESSENTIAL_TOKENIZER_FILES)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
