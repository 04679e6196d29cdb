"""Triton Inference Server model repository for an exported graph (onnxruntime backend) or a TensorRT
engine (tensorrt backend):

  <out>/<name>/config.pbtxt
  <out>/<name>/1/model.onnx (+ model.onnx.data)     backend "onnxruntime"
  <out>/<name>/1/model.plan                          backend "tensorrt"

config.pbtxt declares every graph input and output (KV cache included) with its Triton data type and
dims (-1 for dynamic; the batch dim is implied by max_batch_size), dynamic batching, and instance
groups on GPU. It is written as text and then parsed with the ModelConfig protobuf that tritonclient
ships (`tritonclient.grpc.model_config_pb2`), and compared with the graph's signature — no server.

Serving notes. The KV cache is explicit I/O: the client keeps `present.*` and sends it back as
`past_key_values.*` on the next step. Triton's dynamic batcher only merges requests whose non-batch
dims are equal (same new-token count and same cached length), e.g. decode steps of sequences that
started together; requests of other shapes run in their own batch.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from toolchain.core.errors import ArtifactError, BackendUnavailableError, InvalidOptionError
from toolchain.core.fileio import atomic_dir, write_text
from toolchain.core.iospec import BATCH

from exporters.onnx import MODEL_FILE

BACKENDS = ("onnxruntime", "tensorrt")
CONFIG_FILE = "config.pbtxt"
PLAN_FILE = "model.plan"
VERSION = "1"
ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
# TensorRT engine dtypes (engine.json "io", from trt.DataType names)
TRT_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64",
             "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    shape: list  # full shape: ints, -1 for dynamic (batch included)


@dataclass
class TritonResult:
    model_dir: Path  # <out>/<name>
    config_path: Path
    backend: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    validated_with: str | None  # "tritonclient <version> model_config_pb2", None if tritonclient is absent
    files: list[str] = field(default_factory=list)


def write_triton_repository(source: str | Path, out: str | Path, name: str = "model", backend: str = "onnxruntime",
                            max_batch_size: int = 8, instances: int = 1, gpus: list[int] | None = None,
                            max_queue_delay_us: int = 100, overwrite: bool = False) -> TritonResult:
    """Write the Triton model `name` into the repository dir `out` (other models there are left alone).

    source: backend "onnxruntime": an ONNX export dir (or its model.onnx; a build dir uses onnx/);
            backend "tensorrt": a TensorRT bundle dir with engine/model.plan, an engine dir, or a .plan
            file inside one (the I/O comes from engine/engine.json, else the bundle's model.onnx).
    max_batch_size: Triton's batch limit (a TensorRT bundle's own max_batch caps it). instances: model
    instances per GPU (`gpus`: which GPUs; default all).
    """
    if backend not in BACKENDS:
        raise InvalidOptionError(f"unknown Triton backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise InvalidOptionError(f"Triton model name {name!r} must be letters, digits, '-', '_' or '.'")
    if max_batch_size < 0 or instances < 1 or max_queue_delay_us < 0:
        raise InvalidOptionError("max_batch_size must be ≥ 0, instances ≥ 1 and max_queue_delay_us ≥ 0")
    if backend == "onnxruntime":
        files, inputs, outputs = _onnx_source(source)
        profiles: list[str] = []
    else:
        files, inputs, outputs, profiles, bundle_batch = _tensorrt_source(source)
        if bundle_batch:
            max_batch_size = min(max_batch_size, bundle_batch)
    batched = max_batch_size > 0 and all(_is_batch(t.shape) for t in (*inputs, *outputs))
    if max_batch_size > 0 and not batched:
        max_batch_size = 0  # some tensor has no leading batch dim: Triton must see full shapes
    text = config_text(name, backend, max_batch_size, inputs, outputs, instances, gpus, max_queue_delay_us, profiles)

    model_dir = Path(out) / name
    with atomic_dir(model_dir, overwrite=overwrite) as tmp:
        (tmp / VERSION).mkdir()
        for src, dst_name in files:
            _link_or_copy(src, tmp / VERSION / dst_name)
        write_text(tmp / CONFIG_FILE, text)
        validated = _validate_if_possible(tmp, name, inputs, outputs)
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return TritonResult(model_dir, model_dir / CONFIG_FILE, backend, max_batch_size, inputs, outputs, validated, written)


def config_text(name: str, backend: str, max_batch_size: int, inputs: list[TensorSpec], outputs: list[TensorSpec],
                instances: int = 1, gpus: list[int] | None = None, max_queue_delay_us: int = 100,
                profiles: list[str] | None = None) -> str:
    """config.pbtxt (protobuf text format of inference.ModelConfig)."""
    def tensor(spec: TensorSpec) -> str:
        dims = spec.shape[1:] if max_batch_size > 0 else spec.shape
        return (f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n'
                f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')

    lines = [f'name: "{name}"', f'backend: "{backend}"',
             f'default_model_filename: "{MODEL_FILE if backend == "onnxruntime" else PLAN_FILE}"',
             f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(tensor(t) for t in inputs) + "\n]",
             "output [\n" + ",\n".join(tensor(t) for t in outputs) + "\n]"]
    if max_batch_size > 0:
        preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, max_batch_size) if b <= max_batch_size and b > 1})
        lines.append("dynamic_batching {\n"
                     + (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
                     + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    group = [f"    count: {instances}", "    kind: KIND_GPU"]
    if gpus:
        group.append(f"    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]")
    if profiles:
        group.append(f"    profile: [ {', '.join(json.dumps(p) for p in profiles)} ]")
    lines.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    return "\n".join(lines) + "\n"


# --- validation ------------------------------------------------------------------------------------


def parse_config(path: str | Path):
    """config.pbtxt → tritonclient's inference.ModelConfig message (ArtifactError if it does not parse)."""
    model_config_pb2, text_format = _protobuf()
    path = Path(path)
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except (text_format.ParseError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not a valid Triton model config ({err}); rewrite the repository with "
                            "`toolchain deploy ... --triton`") from None
    return config


def validate_model_dir(model_dir: str | Path, inputs: list[TensorSpec] | None = None,
                       outputs: list[TensorSpec] | None = None, name: str | None = None):
    """Parse <model_dir>/config.pbtxt and check it against the model's signature (by default: the
    ONNX graph in 1/; pass inputs/outputs for a TensorRT plan) and Triton's layout rules. `name`: the
    model name Triton will use (default: the dir name). Returns the ModelConfig message."""
    model_dir = Path(model_dir)
    name = name or model_dir.name
    config = parse_config(model_dir / CONFIG_FILE)
    problems = []
    if config.name != name:
        problems.append(f"name {config.name!r} differs from the model dir name {name!r}")
    if config.backend not in BACKENDS:
        problems.append(f"backend {config.backend!r} is not one of {', '.join(BACKENDS)}")
    version = model_dir / VERSION / (config.default_model_filename or (MODEL_FILE if config.backend == "onnxruntime"
                                                                       else PLAN_FILE))
    if not version.is_file():
        problems.append(f"{version} is missing")
    elif inputs is None and config.backend == "onnxruntime":
        inputs, outputs = graph_signature(version)
    if inputs is not None:
        for kind, declared, expected in (("input", config.input, inputs), ("output", config.output, outputs)):
            problems += _compare(kind, declared, expected, config.max_batch_size)
    if config.max_batch_size > 0 and not config.HasField("dynamic_batching"):
        problems.append("max_batch_size > 0 but no dynamic_batching")
    if not config.instance_group or any(g.kind != g.KIND_GPU for g in config.instance_group):
        problems.append("instance_group must place every instance on KIND_GPU")
    if problems:
        raise ArtifactError(f"{model_dir / CONFIG_FILE}: " + "; ".join(problems))
    return config


def _compare(kind: str, declared, expected: list[TensorSpec], max_batch_size: int) -> list[str]:
    from tritonclient.grpc import model_config_pb2

    problems = []
    got = {t.name: t for t in declared}
    if len(got) != len(declared):
        problems.append(f"duplicate {kind} names")
    for spec in expected:
        entry = got.pop(spec.name, None)
        if entry is None:
            problems.append(f"{kind} {spec.name} of the model is not declared")
            continue
        dtype = model_config_pb2.DataType.Name(entry.data_type)
        dims = spec.shape[1:] if max_batch_size > 0 else spec.shape
        if dtype != spec.data_type:
            problems.append(f"{kind} {spec.name}: data_type {dtype}, the model has {spec.data_type}")
        if list(entry.dims) != list(dims):
            problems.append(f"{kind} {spec.name}: dims {list(entry.dims)}, the model has {dims}")
    problems += [f"{kind} {name} is declared but the model has no such {kind}" for name in got]
    return problems


def graph_signature(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX graph: Triton data types and shapes (-1 for symbolic dims)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return ([_spec(v, path) for v in graph.input if v.name not in initializers], [_spec(v, path) for v in graph.output])


def _spec(value, path) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in ONNX_TYPES:
        raise ArtifactError(f"{path}: {value.name} has ONNX type {onnx.TensorProto.DataType.Name(tensor.elem_type)}, "
                            "which Triton has no data type for")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    batch = bool(tensor.shape.dim) and tensor.shape.dim[0].dim_param == BATCH
    return TensorSpec(value.name, ONNX_TYPES[tensor.elem_type], shape if not batch else [-1, *shape[1:]])


def _is_batch(shape: list) -> bool:
    return bool(shape) and shape[0] == -1


# --- sources ---------------------------------------------------------------------------------------


def _onnx_source(source) -> tuple[list[tuple[Path, str]], list[TensorSpec], list[TensorSpec]]:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / MODEL_FILE).is_file() and (path / "onnx" / MODEL_FILE).is_file():
            path = path / "onnx"  # a build dir
        path = path / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; pass an ONNX export dir (`toolchain export ... --out DIR`)")
    inputs, outputs = graph_signature(path)
    graph = onnx.load(str(path), load_external_data=False)
    files = [(path, MODEL_FILE)]
    for location in sorted(_external_files(graph)):
        data = path.parent / location
        if not data.is_file():
            raise ArtifactError(f"{data} (the graph's external weights) is missing; copy the whole export dir")
        files.append((data, location))
    return files, inputs, outputs


def _tensorrt_source(source):
    path = Path(source).expanduser()
    plan = path if path.is_file() else next((p for p in (path / PLAN_FILE, path / "engine" / PLAN_FILE) if p.is_file()),
                                            None)
    if plan is None:
        raise ArtifactError(f"no TensorRT engine at {path} (looked for {PLAN_FILE} and engine/{PLAN_FILE}); build it "
                            f"on the target GPU first: python -m exporters.tensorrt build {path}")
    engine_dir = plan.parent
    bundle = engine_dir.parent if engine_dir.name == "engine" else engine_dir
    meta = engine_dir / "engine.json"
    profiles: list[str] = []
    if meta.is_file():
        engine = json.loads(meta.read_text())
        inputs = [_engine_spec(t) for t in engine.get("io", []) if t["mode"] == "input"]
        outputs = [_engine_spec(t) for t in engine.get("io", []) if t["mode"] == "output"]
        profiles = [str(p["index"]) for p in engine.get("profiles", [])]
    elif (bundle / MODEL_FILE).is_file():
        inputs, outputs = graph_signature(bundle / MODEL_FILE)
    else:
        raise ArtifactError(f"cannot tell the I/O of {plan}: neither {meta} nor {bundle / MODEL_FILE} exists; pass "
                            "the TensorRT bundle dir")
    if not profiles and (bundle / "trt_build.json").is_file():
        profiles = [str(i) for i, _ in enumerate(json.loads((bundle / "trt_build.json").read_text()).get("profiles", []))]
    limit = 0
    if (bundle / "trt_build.json").is_file():
        limit = int(json.loads((bundle / "trt_build.json").read_text()).get("limits", {}).get("max_batch", 0))
    return [(plan, PLAN_FILE)], inputs, outputs, profiles, limit


def _engine_spec(entry: dict) -> TensorSpec:
    dtype = TRT_TYPES.get(str(entry["dtype"]).upper())
    if dtype is None:
        raise ArtifactError(f"engine tensor {entry['name']} has TensorRT type {entry['dtype']}, which Triton has no "
                            "data type for")
    return TensorSpec(entry["name"], dtype, [int(d) for d in entry["shape"]])


def _external_files(graph: onnx.ModelProto) -> set[str]:
    return {entry.value for tensor in graph.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def _validate_if_possible(model_dir: Path, name: str, inputs, outputs) -> str | None:
    try:
        _protobuf()
    except BackendUnavailableError:
        return None
    validate_model_dir(model_dir, inputs, outputs, name=name)
    import importlib.metadata as md

    return f"tritonclient {md.version('tritonclient')} model_config_pb2"


def _protobuf():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailableError("validating a Triton config needs tritonclient's protobufs: pip install "
                                      "tritonclient[grpc]") from None
    return model_config_pb2, text_format


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
