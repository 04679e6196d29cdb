"""Checks genai_config.json against the graph it names before onnxruntime-genai reads it, so a corrupted
or mismatched config gives one clear ToolchainError instead of a crash inside genai."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto

from toolchain.core.errors import ArtifactError

GENAI_CONFIG = "genai_config.json"
# Types genai runs as a plain decoder-only LLM over separate past key/value inputs. ("gpt2" is not
# here: genai gives it a combined past_%d cache our graphs do not have.)
DECODER_TYPES = ("decoder", "gemma", "gemma2", "granite", "llama", "mistral", "nemotron", "olmo", "phi", "phi3",
                 "qwen2", "qwen3")


class GenaiConfigError(ArtifactError):
    """genai_config.json is missing, corrupted, or does not match the graph beside it."""


def appends_in_place(graph: onnx.ModelProto, layers: int) -> bool:
    """Every layer's attention is a GroupQueryAttention (our fast graph), so past and present can
    share one buffer."""
    return sum(node.op_type == "GroupQueryAttention" for node in graph.graph.node) == layers > 0


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
