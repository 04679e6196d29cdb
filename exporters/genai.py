"""onnxruntime-genai packaging: `genai_config.json` (+ tokenizer files) beside an exported graph, so
`onnxruntime_genai.Model(dir)` loads the (sliced, optionally quantized) model and generates without
this project's code.

What onnxruntime-genai needs and how our graphs meet it:

* I/O names: our graphs already follow genai's decoder convention (input_ids, attention_mask,
  position_ids, past_key_values.%d.key/value → logits, present.%d.key/value); the config names them.
* model.type: genai picks its model class and a few behaviours from it. Every supported source
  architecture maps onto one of genai's decoder-only types (`MODEL_TYPES`); OPT, which genai has no
  type for, uses genai's generic "decoder" type (our graph takes explicit position_ids for it).
* KV cache: genai allocates ONE shape (batch, num_key_value_heads, length, head_size) for every past
  and present tensor of every layer. SliceGPT keeps head dims, so its graphs load as they are. MoDeGPT
  makes key/value head dims differ per layer (and key ≠ value); genai rejects such a graph ("Got
  invalid dimensions for input: past_key_values.0.value"). For those we write `model.genai.onnx`: the
  same graph (same weights file) whose KV inputs/outputs are zero-padded to the largest head dim
  (Slice after each past input, Pad before each present output). Exact: the padded columns are
  never read. Cost: KV memory of max(head dim) per layer instead of each layer's own.
* search.past_present_share_buffer: true for our fast graphs (one GroupQueryAttention per layer,
  which appends the new keys into the past buffer in place: genai then keeps one max_length buffer per
  layer instead of copying the cache every step); false for the basic/none graphs, which concatenate
  past and new keys (present length = past + new).
* Sliding windows (Mistral) live inside our graph (the attention mask), so the config declares none.

`validate_genai_config` checks the config against the graph before genai is ever called, so a
corrupted or mismatched config gives one clear ToolchainError instead of a crash inside genai.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError
from toolchain.core.fileio import atomic_dir, atomic_file, write_json

from exporters.onnx import MODEL_FILE, TOKENIZER_FILES

GENAI_CONFIG = "genai_config.json"
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
# Types genai runs as a plain decoder-only LLM over separate past key/value inputs. ("gpt2" is not
# here: genai gives it a combined past_%d cache our graphs do not have.)
DECODER_TYPES = ("decoder", "gemma", "gemma2", "granite", "llama", "mistral", "nemotron", "olmo", "phi", "phi3",
                 "qwen2", "qwen3")
PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}], "dml": [{"dml": {}}]}
INPUT_NAMES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
OUTPUT_NAMES = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
ESSENTIAL_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class GenaiConfigError(ArtifactError):
    """genai_config.json is missing, corrupted, or does not match the graph beside it."""


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


# --- writing ---------------------------------------------------------------------------------------


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
    onnx_dir = _export_dir(onnx_dir)
    if provider not in PROVIDERS:
        raise InvalidOptionError(f"unknown genai provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    export_config = _read_json(onnx_dir / "export_config.json", "export_config.json")
    model_config = _read_json(onnx_dir / "config.json", "config.json")
    generation = _read_optional_json(onnx_dir / "generation_config.json")
    model_file = export_config.get("model_file", MODEL_FILE)
    graph = onnx.load(str(onnx_dir / model_file), load_external_data=False)
    kv = _kv_dims(graph)
    if not kv:
        raise ArtifactError(f"{onnx_dir / model_file} has no past_key_values.%d.key inputs; export it with "
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
                "inputs": dict(INPUT_NAMES),
                "outputs": dict(OUTPUT_NAMES),
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
    source = _export_dir(onnx_dir)
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


def appends_in_place(graph: onnx.ModelProto, layers: int) -> bool:
    """Every layer's attention is a GroupQueryAttention (our fast graph), so past and present can
    share one buffer."""
    return sum(node.op_type == "GroupQueryAttention" for node in graph.graph.node) == layers > 0


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
                _copy_tokenizer_files(source, onnx_dir)
            else:  # a hub id (offline when cached)
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(onnx_dir))
    elif not _has_tokenizer(onnx_dir):
        source = Path(str(export_config.get("source_model") or "")).expanduser()
        for candidate in (source, source / "sliced"):
            if str(source) and candidate.is_dir() and _has_tokenizer(candidate):
                _copy_tokenizer_files(candidate, onnx_dir)
                break
    if required and not _has_tokenizer(onnx_dir):
        raise ArtifactError(f"{onnx_dir} has no tokenizer files ({', '.join(ESSENTIAL_TOKENIZER_FILES)}) and the "
                            "source model's dir has none either; pass the tokenizer (--tokenizer DIR_OR_HUB_ID, or "
                            "tokenizer= in the API)")
    return sorted(name for name in TOKENIZER_FILES if (onnx_dir / name).is_file())


# --- KV padding for per-layer head dims -------------------------------------------------------------


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
        dim = _kv_last_dim(value, "past_key_values.")
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
        dim = _kv_last_dim(value, "present.")
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
    if not value.name.startswith(prefix) or not value.name.endswith((".key", ".value")):
        return None
    dims = value.type.tensor_type.shape.dim
    return dims[3].dim_value if len(dims) == 4 and dims[3].dim_value else None


def _kv_dims(graph: onnx.ModelProto) -> list[list[tuple[int, int]]]:
    """Per layer [(heads, key dim), (heads, value dim)] of the past inputs."""
    inputs = {v.name: v for v in graph.graph.input}
    layers, i = [], 0
    while f"past_key_values.{i}.key" in inputs:
        entry = []
        for kind in ("key", "value"):
            value = inputs.get(f"past_key_values.{i}.{kind}")
            if value is None:
                raise ArtifactError(f"the graph has past_key_values.{i}.key but no past_key_values.{i}.value")
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if len(dims) != 4 or not dims[1] or not dims[3]:
                raise ArtifactError(f"past_key_values.{i}.{kind} must be (batch, heads, past, head_dim) with static "
                                    f"heads and head_dim; the graph has {dims}")
            entry.append((dims[1], dims[3]))
        layers.append(entry)
        i += 1
    return layers


# --- validation -------------------------------------------------------------------------------------


def validate_genai_config(model_dir: str | Path) -> dict:
    """Check genai_config.json in `model_dir` against the graph it names, before onnxruntime-genai
    reads it. Returns the parsed config; raises GenaiConfigError naming the first problem and the fix."""
    model_dir = Path(model_dir).expanduser()
    path = model_dir / GENAI_CONFIG
    fix = "rewrite it with `toolchain deploy DIR --genai --out NEW_DIR` (or exporters.genai.write_genai_config)"
    if not path.is_file():
        raise GenaiConfigError(f"{path} does not exist; {fix}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GenaiConfigError(f"{path} is not valid JSON ({err}); the file is corrupted: {fix}") from None

    def fail(message: str):
        raise GenaiConfigError(f"{path}: {message}; {fix}")

    def get(obj, key: str, kind, where: str):
        value = obj.get(key) if isinstance(obj, dict) else None
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            fail(f"{where}{key} must be an integer, got {value!r}")
        if kind is not int and not isinstance(value, kind):
            fail(f"{where}{key} must be a {kind.__name__}, got {value!r}")
        return value

    model = get(config, "model", dict, "")
    decoder = get(model, "decoder", dict, "model.")
    model_type = get(model, "type", str, "model.")
    if model_type not in DECODER_TYPES:
        fail(f"model.type {model_type!r} is not a type onnxruntime-genai runs with this graph's separate key/value "
             f"cache; use one of {', '.join(DECODER_TYPES)}")
    vocab = get(model, "vocab_size", int, "model.")
    context = get(model, "context_length", int, "model.")
    for key, value in (("vocab_size", vocab), ("context_length", context)):
        if value <= 0:
            fail(f"model.{key} must be positive, got {value}")
    eos = model.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    for key, ids in (("bos_token_id", [model.get("bos_token_id")]), ("eos_token_id", eos_ids),
                     ("pad_token_id", [model.get("pad_token_id")])):
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            fail(f"model.{key} must be a token id in [0, {vocab}), got {model.get(key)!r}")
    numbers = {key: get(decoder, key, int, "model.decoder.")
               for key in ("head_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads")}
    for key, value in numbers.items():
        if value <= 0:
            fail(f"model.decoder.{key} must be positive, got {value}")
    filename = get(decoder, "filename", str, "model.decoder.")
    graph_path = model_dir / filename
    if not graph_path.is_file():
        fail(f"model.decoder.filename {filename!r} does not exist in {model_dir}")
    inputs = get(decoder, "inputs", dict, "model.decoder.")
    outputs = get(decoder, "outputs", dict, "model.decoder.")
    for key in ("past_key_names", "past_value_names"):
        if "%d" not in str(inputs.get(key, "")):
            fail(f"model.decoder.inputs.{key} must be a name template with %d, got {inputs.get(key)!r}")
    for key in ("present_key_names", "present_value_names"):
        if "%d" not in str(outputs.get(key, "")):
            fail(f"model.decoder.outputs.{key} must be a name template with %d, got {outputs.get(key)!r}")

    try:
        graph = onnx.load(str(graph_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001  (protobuf raises several types for a damaged file)
        raise GenaiConfigError(f"{graph_path} is not a readable ONNX graph ({type(err).__name__}); re-export it") from None
    for location in sorted(_external_files(graph)):
        if not (model_dir / location).is_file():
            fail(f"the graph's weights file {location} is missing from {model_dir}")
    graph_inputs = {v.name: v for v in graph.graph.input}
    graph_outputs = {v.name: v for v in graph.graph.output}
    for key in ("input_ids", "attention_mask", "position_ids"):
        name = inputs.get(key, key)
        # genai feeds position_ids only when the graph has that input; the graph then needs it named
        if name not in graph_inputs and (key != "position_ids" or "position_ids" in graph_inputs):
            fail(f"model.decoder.inputs.{key} names {name!r}, which is not an input of {filename}")
    logits = graph_outputs.get(outputs.get("logits", "logits"))
    if logits is None:
        fail(f"model.decoder.outputs.logits {outputs.get('logits')!r} is not an output of {filename}")
    logits_dims = [d.dim_value for d in logits.type.tensor_type.shape.dim]
    if logits_dims and logits_dims[-1] and logits_dims[-1] != vocab:
        fail(f"model.vocab_size is {vocab} but {filename} has {logits_dims[-1]} logits")
    layers = numbers["num_hidden_layers"]
    graph_layers = 0
    while _compose(inputs["past_key_names"], graph_layers, fail) in graph_inputs:
        graph_layers += 1
    if graph_layers != layers:
        fail(f"model.decoder.num_hidden_layers is {layers} but {filename} has {graph_layers} layers of "
             f"{inputs['past_key_names']!r} inputs")
    expected = (numbers["num_key_value_heads"], numbers["head_size"])
    for i in range(layers):
        for table, key, source in ((graph_inputs, "past_key_names", inputs), (graph_inputs, "past_value_names", inputs),
                                   (graph_outputs, "present_key_names", outputs),
                                   (graph_outputs, "present_value_names", outputs)):
            name = _compose(source[key], i, fail)
            value = table.get(name)
            if value is None:
                fail(f"{name} (from {key}) is not in {filename}")
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if len(dims) != 4 or (dims[1], dims[3]) != expected:
                fail(f"{name} has shape {_shape(value)} but genai will feed (batch, num_key_value_heads="
                     f"{expected[0]}, length, head_size={expected[1]}); genai needs one KV shape for every layer")

    search = get(config, "search", dict, "")
    max_length = get(search, "max_length", int, "search.")
    if not 0 < max_length <= context:
        fail(f"search.max_length {max_length} must be in 1..model.context_length ({context})")
    if search.get("past_present_share_buffer", False) and not appends_in_place(graph, layers):
        fail("search.past_present_share_buffer must be false: this graph concatenates past and new keys (present "
             "length = past + new), a shared buffer needs a GroupQueryAttention graph (`toolchain export "
             "--optimize fast`)")
    if int(search.get("num_beams", 1)) < 1:
        fail(f"search.num_beams must be ≥ 1, got {search.get('num_beams')!r}")
    return config


def _compose(template: str, index: int, fail) -> str:
    try:
        return template % index
    except (TypeError, ValueError):
        fail(f"name template {template!r} must contain exactly one %d")


def _shape(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _external_files(graph: onnx.ModelProto) -> set[str]:
    files = set()
    for tensor in graph.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            files.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return files


# --- running ----------------------------------------------------------------------------------------


def load_genai_model(model_dir: str | Path, validate: bool = True):
    """`onnxruntime_genai.Model` over `model_dir`, after our own check of its config."""
    model_dir = Path(model_dir).expanduser()
    if validate:
        validate_genai_config(model_dir)
    og = _genai()
    try:
        return og.Model(str(model_dir))
    except Exception as err:  # noqa: BLE001  (genai raises RuntimeError/OrtException for everything)
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"onnxruntime-genai could not load {model_dir}: {first}") from err


def genai_generate(model, prompt_ids, max_new_tokens: int = 32) -> list[int]:
    """Greedy generation through onnxruntime-genai: the new token ids (genai stops at EOS)."""
    import numpy as np

    og = _genai()
    if isinstance(model, (str, os.PathLike)):
        model = load_genai_model(model)
    prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(1, -1)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=int(prompt.shape[1] + max_new_tokens))
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def tokenizer_check(model, hf_tokenizer, text: str) -> dict:
    """Does genai's tokenizer (onnxruntime-extensions) encode `text` like the transformers tokenizer?
    (Some pre-tokenizers, e.g. tokenizers' plain Whitespace, are not supported by genai.)"""
    og = _genai()
    ours = [int(t) for t in og.Tokenizer(model).encode(text)]
    theirs = list(hf_tokenizer(text, add_special_tokens=False).input_ids)
    # genai may add the special tokens the tokenizer config asks for (e.g. BOS): compare the text part
    same = ours == theirs or (bool(theirs) and ours[len(ours) - len(theirs):] == theirs)
    return {"text": text, "genai": ours, "transformers": theirs, "equal": same}


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BackendUnavailableError("onnxruntime-genai is not installed; pip install onnxruntime-genai "
                                      "(CPU; onnxruntime-genai-cuda for CUDA)") from None
    return og


# --- helpers ----------------------------------------------------------------------------------------


def _export_dir(path: str | Path) -> Path:
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


def _copy_tokenizer_files(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copyfile(source / name, out / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
