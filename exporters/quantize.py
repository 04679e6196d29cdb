"""Weight-only quantization of an exported (sliced) fp32 graph with onnxruntime's own tools.

  int4   MatMulNBitsQuantizer (onnxruntime.quantization.matmul_nbits_quantizer): every MatMul whose B is
         a constant weight becomes MatMulNBits — 4-bit blocks of `block_size` along K, one fp32 scale
         (and, asymmetric, one 4-bit zero point) per block; activations stay fp32.
  int8   The same with 8-bit blocks (weight-only). `int8_method="dynamic"` uses quantize_dynamic
         instead (int8 weights per channel, MatMulInteger with the activation quantized per tensor at
         run time): on sliced models that is unusable (SmolLM2-135M sliced 0.3, PTB: ppl 148 → 3620),
         because a SliceGPT residual stream keeps its massive-activation channels and one per-tensor
         activation scale flattens everything else.

Residual-reading MatMuls stay at 8 bits in int4 mode (`residual_bits`): SliceGPT fuses every norm's
scale into the linear layers after it, so the shortcuts (Q_pᵀQ_p+1 on the raw residual stream),
head_proj and lm_head multiply the massive-activation channels by weights that used to be tiny norm
scales; 4-bit rounding of those weights is amplified by the activations (sliced SmolLM2, PTB, torch
fake-quant: all-int4 ppl 163 → 2693 with the head alone; int4 blocks + 8-bit residual readers 203).
They are found by their module names, which the exporter keeps in each node's metadata.

Attention's activation×activation MatMuls, embeddings (Gather), norms and the KV cache stay fp32,
so the graph keeps its I/O contract (same names, dtypes and shapes): OrtSession, parity, the
genai package and the Triton repository all take the quantized dir like any export.

The output dir gets model.onnx (+ .data past ~1.8 GB), the export's side files (config.json,
tokenizer files, export_config.json with a "quantization" entry) and quantize_report.json: sizes
(measured and the expected size computed from the MatMul weight bytes), and parity against the fp32
graph — top-1/top-5 agreement and, given text, perplexity of both.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from toolchain.core.errors import ArtifactError, InvalidOptionError

from exporters.genai.config import export_dir as _export_dir
from toolchain.core.fileio import atomic_dir, write_json

from exporters import onnx_graph
from exporters.hf_config import CANONICAL_CONFIG, CONFIG
from exporters.onnx import EXTERNAL_DATA_THRESHOLD, MODEL_FILE
from toolchain.core.tokenizer_files import TOKENIZER_FILES

MODES = ("int4", "int8")
ALGORITHMS = ("minmax", "hqq", "gptq")
# --quant-compute → MatMulNBits accuracy_level (4: int8 activations per block; 0: fp32)
COMPUTE_LEVELS = {"int8": 4, "fp32": 0}
INT8_METHODS = ("nbits", "dynamic")
# module-name patterns of the MatMuls that read the residual stream or the final (fused) norm
RESIDUAL_READERS = ("_shortcut", "head_proj", "lm_head")
REPORT_FILE = "quantize_report.json"
SIDE_FILES = (CONFIG, CANONICAL_CONFIG, "export_config.json", *TOKENIZER_FILES)


def accuracy_level(compute: str) -> int:
    """MatMulNBits accuracy_level for a --quant-compute name."""
    if compute not in COMPUTE_LEVELS:
        raise InvalidOptionError(f"unknown --quant-compute {compute!r}; choose one of {', '.join(COMPUTE_LEVELS)}")
    return COMPUTE_LEVELS[compute]


@dataclass
class QuantizeOptions:
    mode: str = "int4"  # int4 | int8
    block_size: int = 32  # MatMulNBits: weights per block along K (power of 2, ≥ 16)
    symmetric: bool = False  # MatMulNBits: no zero points (smaller, usually a little less accurate)
    # MatMulNBits compute type. 4 (int8 activations, per block) is what onnxruntime-genai's builder uses and
    # ORT's fast CPU kernel; 0 computes in fp32, closer to the fp32 outputs but slower on CPU than the fp32
    # graph itself (the README's quantization table has the measurements). CUDA ignores it.
    accuracy_level: int | None = 4
    int8_method: str = "nbits"  # int8: nbits (MatMulNBits 8-bit, weight-only) | dynamic (quantize_dynamic)
    per_channel: bool = True  # int8 dynamic: one scale per output channel (else per tensor)
    residual_bits: int = 8  # int4: bits of the residual-reading MatMuls (8, 4, or 32 = keep fp32)
    # int4 blocks: minmax (round to nearest over each block's range) | hqq | gptq (calibrated, needs the
    # canonical model: quantize_onnx's `calibration`)
    algorithm: str = "minmax"
    # int4: the token table as a 4-bit GatherBlockQuantized (one table with a tied 4-bit head)
    embeddings: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InvalidOptionError(f"unknown --quantize {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.int8_method not in INT8_METHODS:
            raise InvalidOptionError(f"unknown int8 method {self.int8_method!r}; choose one of {', '.join(INT8_METHODS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidOptionError(f"--block-size must be a power of 2 ≥ 16, got {self.block_size}")
        if self.residual_bits not in (4, 8, 32):
            raise InvalidOptionError(f"--residual-bits must be 4, 8 or 32 (32 keeps them fp32), got {self.residual_bits}")
        if self.algorithm not in ALGORITHMS:
            raise InvalidOptionError(f"unknown --quant-algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "gptq" and self.symmetric:
            raise InvalidOptionError("--quant-algorithm gptq writes asymmetric blocks; drop symmetric")
        if self.embeddings and self.mode != "int4":
            raise InvalidOptionError("--quantize-embeddings stores the token table at 4 bits; use it with --quantize int4")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise InvalidOptionError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def nbits(self) -> int | None:
        """Bits of the MatMulNBits path, None for dynamic int8."""
        return 4 if self.mode == "int4" else (8 if self.int8_method == "nbits" else None)

    def bits_for(self, module: str) -> int | None:
        """MatMulNBits bits for the MatMul of `module` (None: keep fp32; dynamic int8: 8)."""
        if self.nbits is None:
            return 8
        if self.mode == "int4" and any(pattern in module for pattern in RESIDUAL_READERS):
            return None if self.residual_bits == 32 else self.residual_bits
        return self.nbits


@dataclass
class QuantizeResult:
    out_dir: Path
    model_path: Path
    report: dict = field(repr=False)


def quantize_onnx(onnx_dir: str | Path, out: str | Path, mode: str = "int4", block_size: int = 32,
                  options: QuantizeOptions | None = None, parity: bool = True, eval_text: str | None = None,
                  eval_windows: int = 4, eval_seqlen: int = 256, calibration=None, progress=None) -> QuantizeResult:
    """Quantize the fp32 export at `onnx_dir` into the new dir `out`.

    `options` (if given) overrides mode/block_size. parity: compare with the fp32 graph on random
    token ids (batch 4, prefill + 4 decode steps); eval_text (e.g. "ptb" or a file, needs the
    tokenizer files in the export): top-1 agreement and perplexity of both graphs on `eval_windows`
    windows of `eval_seqlen` tokens of its test split instead. Results go to quantize_report.json.
    `calibration` (exporters.gptq_weights.Calibration): the canonical model and text GPTQ runs on
    (--quant-algorithm gptq only).
    """
    options = options or QuantizeOptions(mode=mode, block_size=block_size)
    options.validate()
    if options.algorithm == "gptq" and calibration is None:
        raise InvalidOptionError("--quant-algorithm gptq needs the canonical model the export came from "
                                 "(a build dir); a bare export dir has only the ONNX graph")
    source = _export_dir(onnx_dir)
    export_config = json.loads((source / "export_config.json").read_text())
    if export_config.get("dtype") != "fp32" or export_config.get("quantization"):
        raise InvalidOptionError(f"{source} is a {(export_config.get('quantization') or {}).get('mode') or export_config.get('dtype')} "
                                 "export; quantize the fp32 export (int4/int8 replace its fp32 weights)")
    src_model = source / export_config.get("model_file", MODEL_FILE)
    out = Path(out)
    start = time.perf_counter()
    graph = onnx.load(str(src_model), load_external_data=False)

    with atomic_dir(out, overwrite=options.overwrite) as tmp:
        model = onnx.load(str(src_model))  # with weights
        parts_before = part_bytes(model)  # the writer edits `model` in place
        quantized, tool = _quantize(model, src_model, tmp, options, calibration, progress)
        seconds = time.perf_counter() - start
        external = onnx_graph.initializer_bytes(quantized) >= EXTERNAL_DATA_THRESHOLD
        onnx_graph.save(quantized, tmp / MODEL_FILE, external)
        for name in SIDE_FILES:
            if (source / name).is_file() and name != "export_config.json":
                shutil.copyfile(source / name, tmp / name)
        final = onnx_graph.load_graph(tmp / MODEL_FILE)
        counts = onnx_graph.op_counts(final)
        sizes = {"fp32_bytes": _model_bytes(src_model), "quantized_bytes": _model_bytes(tmp / MODEL_FILE)}
        sizes["ratio"] = sizes["quantized_bytes"] / sizes["fp32_bytes"]
        embeddings = _embedding_record(quantized) if options.mode == "int4" else {"quantized": False}
        expected = expected_sizes(graph, source, options, shared_table=embeddings.get("shared_with_head", False))
        sizes.update(expected)
        sizes["expected_ratio"] = expected["expected_bytes"] / sizes["fp32_bytes"]
        parts_after = part_bytes(quantized)
        sizes["parts"] = {part: {"fp32_bytes": parts_before.get(part, 0), "quantized_bytes": parts_after.get(part, 0)}
                          for part in PARTS}
        record = {"mode": options.mode, "tool": tool, "block_size": options.block_size if options.nbits else None,
                  "symmetric": options.symmetric if options.nbits else None,
                  "matmul_bits": expected["matmul_bits"], "source": str(source)}
        if options.mode == "int4":
            record["embeddings"] = embeddings
        if calibration is not None and options.algorithm == "gptq":
            record["calibration"] = calibration.key()
        write_json(tmp / "export_config.json", {**export_config, "external_data": MODEL_FILE + onnx_graph.DATA_SUFFIX
                                                if external else None, "quantization": record})
        report = {
            "options": {k: v for k, v in asdict(options).items() if k != "overwrite"},
            "quantization": record,
            "op_counts": {"fp32": onnx_graph.op_counts(graph), "quantized": counts},
            "sizes": sizes,
            "seconds": round(seconds, 2),
        }
        if parity or eval_text:
            report["parity"] = quantization_parity(source, tmp, eval_text, eval_windows, eval_seqlen)
        write_json(tmp / REPORT_FILE, report)
    return QuantizeResult(out, out / MODEL_FILE, report)


def _quantize(model: onnx.ModelProto, src_model: Path, tmp: Path, options: QuantizeOptions,
              calibration=None, progress=None):
    with _quiet():  # before the imports: onnxruntime.quantization sets the root logger to INFO on import
        import onnxruntime

        matmuls = _weight_matmuls(model)
        for index, node in enumerate(matmuls):  # the quantizers select nodes by name
            node.name = node.name or f"toolchain_matmul_{index}"
        if not matmuls:
            raise ArtifactError(f"{src_model} has no MatMul with a constant weight to quantize")
        if options.nbits:
            plan = {node.name: options.bits_for(module_name(node)) for node in matmuls}
            passes = sorted({bits for bits in plan.values() if bits is not None}, reverse=True)
            widths = ", ".join(f"{sum(1 for b in plan.values() if b == bits)} MatMuls at {bits} bits" for bits in passes)
            kept = sum(1 for b in plan.values() if b is None)
            table = token_table(model)
            if options.algorithm in ("minmax", "gptq") and not options.symmetric:
                # our writer: the same bytes as MatMulNBitsQuantizer for minmax, and the only way to store
                # GPTQ codes or share the token table with the head
                from exporters.nbits import replace_matmuls

                calibrated = {}
                if options.algorithm == "gptq":
                    from exporters.gptq_weights import gptq_weights

                    calibrated = gptq_weights(calibration, options.block_size, lambda name: options.bits_for(name) == 4,
                                              bits=4, progress=progress)
                weights = block_weights(model, matmuls, plan, options, calibrated)
                tied = tied_head(model, table, matmuls)
                replace_matmuls(model, weights, options.accuracy_level)
                shared = tied if tied in weights and weights[tied].bits == 4 else None
                embedded = _quantize_table(model, table, shared, weights.get(shared), options) if options.embeddings else ""
                return model, (f"toolchain MatMulNBits writer (onnxruntime {onnxruntime.__version__}; {options.algorithm}, "
                               f"block_size={options.block_size}, asymmetric; {widths}{f', {kept} kept fp32' if kept else ''}"
                               f"{embedded})")
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            modules = {node.name: list(node.metadata_props) for node in matmuls}
            for bits in passes:  # one pass per bit width; each rewrites only its own nodes
                # (nodes_to_include adds to the op types it quantizes anyway: exclude the others instead)
                quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=options.block_size,
                                                 is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                                                 nodes_to_exclude=[name for name, b in plan.items() if b != bits],
                                                 algo_config=_algorithm_config(options, bits))
                quantizer.process()
                model = quantizer.model.model
            for node in model.graph.node:  # the quantizer's nodes lose the module names the report reads
                if node.op_type == "MatMulNBits" and not node.metadata_props:
                    node.metadata_props.extend(modules.get(node.name.rsplit("_Q", 1)[0], []))
            embedded = _quantize_table(model, token_table(model), None, None, options) if options.embeddings else ""
            return model, (f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer ({options.algorithm}, block_size={options.block_size}, "
                           f"{'symmetric' if options.symmetric else 'asymmetric'}; {widths}"
                           f"{f', {kept} kept fp32' if kept else ''}{embedded})")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        external = onnx_graph.initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD
        staged = tmp / ".fp32.onnx"  # quantize_dynamic reads a path (the graph may exceed 2 GB in memory)
        onnx_graph.save(model, staged, external=external)
        names = [n.name for n in matmuls]
        quantize_dynamic(str(staged), str(tmp / ".int8.onnx"), op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=names if all(names) else None, per_channel=options.per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=external,
                         extra_options={"MatMulConstBOnly": True})
        quantized = onnx.load(str(tmp / ".int8.onnx"))
        for path in tmp.glob(".*.onnx*"):
            path.unlink()
        return quantized, (f"onnxruntime {onnxruntime.__version__} quantize_dynamic (QInt8 weights "
                           f"{'per channel' if options.per_channel else 'per tensor'}, MatMulInteger)")


def block_weights(model: onnx.ModelProto, matmuls: list, plan: dict, options: QuantizeOptions,
                  calibrated: dict) -> dict:
    """{B initializer name: BlockQuantized of W = Bᵀ} for every MatMul the plan quantizes: the
    calibrated (GPTQ) codes where there are 4-bit ones for its module, else round to nearest."""
    from toolchain.core.blockquant import rtn_quantize

    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in matmuls:
        bits, name = plan[node.name], node.input[1]
        if bits is None or name in weights:
            continue
        b = onnx.numpy_helper.to_array(inits[name])
        if bits == 4 and calibrated:
            weights[name] = _calibrated_weight(module_name(node).removeprefix("model."), calibrated, b.shape)
        else:
            weights[name] = rtn_quantize(np.ascontiguousarray(b.T, dtype=np.float32), options.block_size, bits)
    return weights


# the fast graph packs Linears that read one input into one MatMul (exporters/ort_fusion.py)
PACKED = {".attn.qkv_proj": (".attn.q_proj", ".attn.k_proj", ".attn.v_proj"),
          ".mlp.gate_up_proj": (".mlp.gate_proj", ".mlp.up_proj")}


def _calibrated_weight(module: str, calibrated: dict, b_shape: tuple):
    from exporters.nbits import concat_n

    parts = [module]
    for packed, members in PACKED.items():
        if module.endswith(packed):
            parts = [module.removesuffix(packed) + member for member in members]
    missing = [part for part in parts if part not in calibrated]
    if missing:
        raise ArtifactError(f"the calibrated weights have no {', '.join(missing)} (MatMul of module {module!r})")
    # packing along N is exact: every member was quantized on the same input
    q = calibrated[parts[0]] if len(parts) == 1 else concat_n([calibrated[part] for part in parts])
    if tuple(q.codes.shape) != (b_shape[1], b_shape[0]):
        raise ArtifactError(f"calibrated {module} is {tuple(q.codes.shape)}; the graph's weight is [N={b_shape[1]}, K={b_shape[0]}]")
    return q


def token_table(model: onnx.ModelProto):
    """The Gather of the token table on input_ids, or None."""
    from toolchain.core.iospec import INPUT_IDS

    inits = {t.name for t in model.graph.initializer}
    return next((node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits
                 and node.input[1] == INPUT_IDS), None)


def tied_head(model: onnx.ModelProto, table, matmuls: list) -> str | None:
    """The MatMul weight that is the token table transposed (a tied head the fast graph stores twice)."""
    if table is None:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    rows = inits[table.input[0]]
    for node in matmuls:
        b = inits[node.input[1]]
        if list(b.dims) == list(rows.dims)[::-1] and np.array_equal(onnx.numpy_helper.to_array(b).T,
                                                                    onnx.numpy_helper.to_array(rows)):
            return node.input[1]
    return None


def _quantize_table(model: onnx.ModelProto, table, head_weight: str | None, head, options: QuantizeOptions) -> str:
    """The token table as GatherBlockQuantized (4 bits): with `head_weight` (the tied head's fp32
    weight name, now a 4-bit MatMulNBits of the same matrix) the lookup reads the head's packed
    table; else the table gets its own round-to-nearest blocks. Returns a note for the tool line."""
    from exporters.nbits import gather_block_quantized
    from toolchain.core.blockquant import rtn_quantize

    if table is None:
        return "; no token table Gather to quantize"
    if head_weight is not None:
        gather_block_quantized(model, table, head, head_weight, ensure_initializers=False)
        return "; token table: the tied head's int4 table (GatherBlockQuantized)"
    rows = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == table.input[0]))
    q = rtn_quantize(np.asarray(rows, np.float32), options.block_size, 4)
    gather_block_quantized(model, table, q, table.input[0], ensure_initializers=True)
    return "; token table: int4 round to nearest (GatherBlockQuantized)"


def _embedding_record(model: onnx.ModelProto) -> dict:
    lookups = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    if not lookups:
        return {"quantized": False}
    producers = {out: n for n in model.graph.node for out in n.output}
    table = producers[lookups[0].input[0]].input[0]  # the Reshape's packed table
    shared = any(n.op_type == "MatMulNBits" and n.input[1] == table for n in model.graph.node)
    return {"quantized": True, "bits": 4, "shared_with_head": shared}


def _algorithm_config(options: QuantizeOptions, bits: int):
    """None: ORT's default blockwise min/max rounding. hqq: half-quadratic optimisation of each 4-bit
    block's scale and zero point (ORT's HQQ config; 8-bit passes keep min/max)."""
    if options.algorithm == "minmax" or bits != 4:
        return None
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=bits)


def _weight_matmuls(model: onnx.ModelProto) -> list:
    """MatMul nodes whose B is a 2-D float initializer (the ones both quantizers rewrite)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            tensor = inits[node.input[1]]
            if len(tensor.dims) == 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                nodes.append(node)
    return nodes


def module_name(node) -> str:
    """The torch module a node was exported from (the exporter's `namespace` metadata), or ''."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    # ".../model.layers.0.attn_shortcut: torch.nn.modules.linear.Linear/linear: aten.linear.default"
    parts = [part.split(":")[0] for part in namespace.split("/")]
    return next((part for part in reversed(parts) if part.startswith("model.")), "")


def expected_sizes(graph: onnx.ModelProto, source: Path, options: QuantizeOptions, shared_table: bool = False) -> dict:
    """The size the quantized graph should have: the fp32 file minus the MatMul weights' fp32 bytes
    plus their quantized bytes (packed weights, scales, zero points). Weights another op also reads
    (e.g. a tied embedding) keep their fp32 copy. With options.embeddings the token table is 4-bit
    blocks too, stored once with the head's when `shared_table`."""
    inits = {t.name: t for t in graph.graph.initializer}
    users: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    matmuls = _weight_matmuls(graph)
    fp32_bytes = quant_bytes = 0
    bits_of = {node.input[1]: options.bits_for(module_name(node)) for node in matmuls}
    for name, bits in bits_of.items():
        if bits is None:
            continue  # kept fp32
        k, n = inits[name].dims
        item = 2 if inits[name].data_type == onnx.TensorProto.FLOAT16 else 4
        shared = users.get(name, 0) > sum(1 for m in matmuls if m.input[1] == name)
        fp32_bytes += 0 if shared else k * n * item
        if options.nbits:
            blocks = math.ceil(k / options.block_size)
            packed = n * blocks * options.block_size * bits // 8
            scales = n * blocks * item
            zeros = 0 if options.symmetric else n * math.ceil(blocks * bits / 8)
            quant_bytes += packed + scales + zeros
        else:
            channels = n if options.per_channel else 1
            quant_bytes += k * n + channels * (4 + 1)  # int8 weights, fp32 scale, int8 zero point
    table = token_table(graph) if options.embeddings and options.mode == "int4" else None
    if table is not None:
        rows = inits[table.input[0]]
        vocab, width = rows.dims
        fp32_bytes += vocab * width * (2 if rows.data_type == onnx.TensorProto.FLOAT16 else 4)
        blocks = math.ceil(width / options.block_size)
        quant_bytes += 0 if shared_table else vocab * (blocks * options.block_size // 2 + blocks * 4 + math.ceil(blocks / 2))
    total = _model_bytes(source / MODEL_FILE)
    counts = {str(bits or 32): sum(1 for b in bits_of.values() if b == bits) for bits in set(bits_of.values())}
    return {"matmul_weights": len(matmuls), "matmul_bits": counts, "matmul_fp32_bytes": fp32_bytes, "matmul_quantized_bytes": quant_bytes,
            "other_bytes": total - fp32_bytes, "expected_bytes": total - fp32_bytes + quant_bytes}


# --- bytes by part ---------------------------------------------------------------------------------

PARTS = ("token_table", "head", "block_linears", "shortcuts_projections", "other")


def part_of(module: str) -> str:
    """The report part of a weight MatMul's module (or weight) name."""
    if "lm_head" in module:
        return "head"
    if any(p in module for p in ("_shortcut", "head_proj", "embed_proj")):
        return "shortcuts_projections"
    if "layers." in module:
        return "block_linears"
    return "other"


def part_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes of the graph by part: the token table (Gather / GatherBlockQuantized on
    input_ids), the head, the blocks' linears, shortcuts and projections, everything else. A table
    the head and the lookup share counts as the head's."""
    from toolchain.core.iospec import INPUT_IDS

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    lookup_tables = set()
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and len(node.input) > 1 and node.input[1] == INPUT_IDS:
            for name in node.input[:1] + node.input[2:]:
                lookup_tables.add(name)
                if name in producers:  # GatherBlockQuantized reads the table through a Reshape
                    lookup_tables.update(producers[name].input)
    totals = dict.fromkeys(PARTS, 0)
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data) if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).nbytes
        weights = [n for n in readers.get(tensor.name, []) if n.op_type in ("MatMul", "MatMulNBits") and len(n.input) > 1
                   and tensor.name in n.input[1:]]
        if weights:
            part = part_of(module_name(weights[0]) or tensor.name)
        else:
            part = "token_table" if tensor.name in lookup_tables else "other"
        totals[part] += size
    return totals


# --- parity ----------------------------------------------------------------------------------------


def quantization_parity(reference: str | Path, candidate: str | Path, eval_text: str | None = None,
                        windows: int = 4, seqlen: int = 256) -> dict:
    """Quantized vs fp32 graph: top-1 agreement (share of positions with the same argmax), top-5 overlap,
    logits cosine; with eval_text also the perplexity of both, scored by runtime.evaluate.perplexity
    on the same windows (exp(mean NLL) over every scored token)."""
    from runtime.sessions import OrtSession

    ref, cand = OrtSession(reference, name="ort-fp32"), OrtSession(candidate, name="ort-quantized")
    if eval_text is None:
        from runtime.parity import make_inputs, run_steps

        inputs = make_inputs(ref.vocab_size, batch=4, prompt=32, pad=3, decode_steps=4)
        rows = []
        for result in (run_steps(ref, inputs), run_steps(cand, inputs)):
            rows.append(np.concatenate([s.logits[s.query_mask] for s in result.steps]).astype(np.float32))
        return {"inputs": "random token ids: batch 4, prompt 32 (left padding 3), prefill + 4 decode steps",
                **_agreement(*rows)}
    from runtime.evaluate import perplexity
    from toolchain.data.sources import load_tokenizer
    from toolchain.data.text import eval_windows as make_windows
    from toolchain.data.text import load_text

    tokenizer = load_tokenizer(_export_dir(reference))
    data = make_windows(tokenizer, load_text(eval_text, "test"), seqlen=seqlen, max_windows=windows)
    rows: dict[str, list[np.ndarray]] = {"reference": [], "candidate": []}
    ppl = {}
    for key, session in (("reference", ref), ("candidate", cand)):
        ppl[key] = perplexity(session, tokenizer, data, on_scored=lambda scored, out=rows[key]: out.append(scored.numpy()))
    return {"inputs": f"{len(data.input_ids)} windows x {seqlen} tokens of {eval_text} (test split)",
            **_agreement(np.concatenate(rows["reference"]), np.concatenate(rows["candidate"])),
            "ppl_fp32": ppl["reference"]["ppl"], "ppl_quantized": ppl["candidate"]["ppl"],
            "ppl_delta": ppl["candidate"]["ppl"] - ppl["reference"]["ppl"], "tokens": ppl["reference"]["tokens"]}


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    from runtime.parity import error_metrics, topk_agreement

    top1, top5 = topk_agreement(reference, candidate)
    metrics = error_metrics(reference, candidate)
    return {"top1": top1, "top5": top5, "cosine": metrics["cosine"], "logits_max_abs": metrics["max_abs"],
            "rows": int(reference.shape[0])}


# --- helpers ---------------------------------------------------------------------------------------




def _model_bytes(path: Path) -> int:
    """The graph file plus its external weights file(s)."""
    total = path.stat().st_size
    graph = onnx.load(str(path), load_external_data=False)
    for location in {e.value for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                     for e in t.external_data if e.key == "location"}:
        total += (path.parent / location).stat().st_size
    return total


class _quiet:
    """onnxruntime.quantization logs one INFO line per tensor (and sets the root logger to INFO when
    imported); keep the CLI output to what the user can act on."""

    def __enter__(self):
        import logging

        self.root_level, self.disabled = logging.getLogger().level, logging.root.manager.disable
        logging.disable(logging.WARNING)
        return self

    def __exit__(self, *exc):
        import logging

        logging.disable(self.disabled)
        logging.getLogger().setLevel(self.root_level)
        return False
