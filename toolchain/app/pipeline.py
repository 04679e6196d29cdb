"""`toolchain build`: compress → (recover) → export → (TensorRT bundle) → validate → (quantize) → (deploy) → bench
→ (eval), on one build dir.

Each stage is a function `stage(build_dir, options, progress) -> None` writing one output dir
atomically (`progress(done, total)` drives the CLI's progress bar; it may be None).
`manifest.json` records for every stage its status, options, the hash of its inputs, library
versions, timings and the sha256 of every output file. A stage is skipped when the manifest says
it finished with the same key (its options + the hashes of what it reads) and its files still hash
the same; so a killed build resumes at the first unfinished stage, and changed options or inputs
redo exactly the stages they affect.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from toolchain import __version__
from toolchain.app.model_card import CARD, write_build_cards
from toolchain.compress.options import CompressOptions, RecoverOptions
from toolchain.core.build_dirs import COMPRESSED, MODEL_DIRS, RECOVERED, model_dir
from toolchain.core.errors import InvalidOptionError, OutputPathError, ToolchainError
from toolchain.core.fileio import LOCK_FILE, exclusive_dir, sha256_file, write_json
from toolchain.core.versions import library_versions


class ParityError(ToolchainError):
    """The exported model does not match the torch model within tolerance."""

    exit_code = 1


MANIFEST = "manifest.json"
EVAL_WINDOWS = 32  # 32 x 512 PTB test tokens: a few minutes on 2 CPU cores
SCHEMA = "toolchain.build/1"
TARGETS = ("torch", "onnx", "trt")
DTYPES = ("fp32", "fp16")
DEPLOY_KINDS = ("genai", "triton")
QUANTIZE_EVAL_WINDOWS = 4  # x --seqlen tokens of the calibration text's test split: top-1 and ppl vs fp32


@dataclass(kw_only=True)
class BuildOptions(CompressOptions, RecoverOptions):
    """The compress and recover stages' options (declared in toolchain/compress/options.py) and the later stages'."""

    target: str = "onnx"
    dtype: str = "fp32"  # ONNX precision (the TensorRT bundle is always fp16)
    provider: str = "cpu"
    bench: bool = True
    eval: str | None = None  # e.g. "ptb": perplexity of dense and compressed
    quantize: str | None = None  # int4 | int8: weight-only quantization of the fp32 ONNX export
    block_size: int = 32  # int4/int8 block along K
    quant_algorithm: str = "minmax"  # int4 blocks: minmax | hqq
    quant_compute: str = "int8"  # MatMulNBits activations on CPU: int8 (fast) | fp32
    quantize_embeddings: bool = False  # int4: the token table as 4-bit blocks (shared with a tied 4-bit head)
    residual_bits: int = 8  # int4: bits of the head, head_proj and shortcuts
    deploy: str | None = None  # genai | triton: a package for that runtime under deploy/

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise InvalidOptionError(f"unknown --target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise InvalidOptionError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.target == "torch" and self.dtype != "fp32":
            raise InvalidOptionError("--dtype applies to the exported model; the torch target saves fp32 weights "
                                     "(use --target onnx --dtype fp16, or load the saved model with torch_dtype)")
        self._validate_outputs()
        if self.eval is not None:
            from toolchain.data.text import check_source_name

            check_source_name(self.eval)
        if self.target != "torch":
            from runtime.sessions import provider_name

            provider_name(self.provider)  # a missing ORT provider fails now, not after compressing
        self.compress_options().validate()
        self.recover_options().validate()  # without --recover too: a value out of its range is a mistake either way

    def _validate_outputs(self) -> None:
        if self.quantize is not None:
            self.quantize_options().validate()  # unknown mode, block size, algorithm
            if self.target != "onnx":
                raise InvalidOptionError(f"--quantize produces an ONNX Runtime graph; use it with --target onnx "
                                         f"(--target {self.target} has no quantized output)")
            if self.dtype != "fp32":
                raise InvalidOptionError("--quantize replaces the fp32 weights of the export; drop --dtype fp16")
        if self.deploy is not None:
            if self.deploy not in DEPLOY_KINDS:
                raise InvalidOptionError(f"unknown --deploy {self.deploy!r}; choose one of {', '.join(DEPLOY_KINDS)}")
            if self.target == "torch":
                raise InvalidOptionError(f"--deploy {self.deploy} packages the ONNX export; use --target onnx")

    def quantize_options(self):
        from exporters.quantize import QuantizeOptions, accuracy_level

        return QuantizeOptions(mode=self.quantize, block_size=self.block_size, algorithm=self.quant_algorithm,
                               accuracy_level=accuracy_level(self.quant_compute), embeddings=self.quantize_embeddings,
                               residual_bits=self.residual_bits, overwrite=True)

    def calibration(self, build: Path):
        """GPTQ's canonical model (the one the build exported) and calibration windows."""
        from exporters.gptq_weights import Calibration

        return Calibration(model_dir(build), self.calib, self.nsamples, self.seqlen)

    def compress_options(self) -> CompressOptions:
        return CompressOptions(**{f.name: getattr(self, f.name) for f in fields(CompressOptions)})


@dataclass
class Stage:
    name: str
    output: str  # dir under the build dir
    run: Callable[[Path, BuildOptions, Callable | None], str | None]  # returns an optional note
    options: Callable[[BuildOptions], dict]  # the options that change this stage's output
    reads: tuple[str, ...] = ()  # outputs of earlier stages this stage reads
    targets: tuple[str, ...] = TARGETS
    enabled: Callable[[BuildOptions], bool] = field(default=lambda options: True)


# --- stages -------------------------------------------------------------------------------------


def run_compress(build: Path, options: BuildOptions, progress=None) -> None:
    from toolchain.compress.stage import compress_to_dir

    compress_to_dir(options.compress_options(), build / "sliced", overwrite=True, progress=progress)


def run_recover(build: Path, options: BuildOptions, progress=None) -> str:
    """Recovery training of the compressed model into recovered/ (resumes from its last checkpoint)."""
    from toolchain.compress.recover import recover_to_dir

    result = recover_to_dir(build / COMPRESSED, build / RECOVERED, options.recover_options(), device=options.device,
                            overwrite=True, progress=progress)
    r = result.report
    return (f"{r['method']}: held-out ppl {r['eval_ppl_before']:.2f} -> {r['best']['eval_ppl']:.2f} "
            f"(best step {r['best']['step']} of {r['steps']}, {r['tokens_seen']:,} tokens)")


def drop_stale_recovery(build: Path, manifest: dict) -> None:
    """A rerun without --recover: the build's model is sliced/ again, so recovered/ must go (later
    stages find the model by whether recovered/ exists: toolchain.core.build_dirs)."""
    manifest["stages"].pop("recover", None)
    if (build / RECOVERED).exists():
        shutil.rmtree(build / RECOVERED)


def run_export(build: Path, options: BuildOptions, progress=None) -> None:
    from exporters.onnx import ExportOptions, export_onnx

    export_onnx(model_dir(build), build / "onnx", ExportOptions(dtype=options.dtype, optimize=_export_graph(options),
                                                                overwrite=True))


def _export_key(options: BuildOptions) -> dict:
    key = {"dtype": options.dtype}
    return key if _export_graph(options) == "fast" else key | {"graph": _export_graph(options)}


def _export_graph(options: BuildOptions) -> str:
    """The graph a build validates and benches on its provider: ORT's CUDA GroupQueryAttention refuses
    the fast graph's padding bias (runtime.sessions.cuda_attention_blocker), so GPU builds get `basic`."""
    return "fast" if options.provider == "cpu" else "basic"


def run_trt_bundle(build: Path, options: BuildOptions, progress=None) -> str:
    """Always write the portable bundle; build the engine in the same run only where TensorRT and a
    GPU are present. Returns the one-line outcome for the user."""
    from exporters.tensorrt import build_engine_if_available, write_bundle

    write_bundle(model_dir(build), build / "trt", overwrite=True)
    return build_engine_if_available(build / "trt").message


def run_validate(build: Path, options: BuildOptions, progress=None) -> None:
    from runtime.validate import validate

    result = validate([build], dtype=options.dtype, provider=options.provider, report_dir=build / "reports" / "parity")
    if not result.passed:
        failed = [c["check"] for c in result.report["checks"] if not c["passed"]]
        raise ParityError(f"the ONNX export does not match the torch model ({', '.join(failed)}); "
                          f"see {result.markdown_path}")


def run_quantize(build: Path, options: BuildOptions, progress=None) -> str:
    """Weight-only int4/int8 of the fp32 export, with top-1 agreement and perplexity against it on the
    calibration text's test split (a parity report, not a gate: rounding costs what it costs)."""
    from exporters.quantize import quantize_onnx

    quantize = options.quantize_options()
    result = quantize_onnx(build / "onnx", build / "quantized", eval_text=options.calib,
                           eval_windows=QUANTIZE_EVAL_WINDOWS, eval_seqlen=options.seqlen, options=quantize,
                           calibration=options.calibration(build) if quantize.algorithm == "gptq" else None,
                           progress=progress)
    sizes, parity = result.report["sizes"], result.report["parity"]
    return (f"{options.quantize}: {sizes['quantized_bytes'] / 2**20:.1f} MB ({sizes['ratio']:.3f} x fp32), "
            f"top-1 agreement with fp32 {parity['top1']:.3f}, ppl {parity['ppl_fp32']:.2f} -> "
            f"{parity['ppl_quantized']:.2f} ({parity['inputs']})")


def run_deploy(build: Path, options: BuildOptions, progress=None) -> str:
    """deploy/: an onnxruntime-genai model dir, or a Triton model repository holding the model `llm`
    (ONNX Runtime backend; `toolchain deploy --triton --backend tensorrt` serves a built engine)."""
    source = build / ("quantized" if options.quantize else "onnx")
    if options.deploy == "genai":
        from exporters.genai import export_genai

        done = export_genai(source, build / "deploy", overwrite=True)
        return f"onnxruntime_genai.Model({str(build / 'deploy')!r}) loads {done.model_file} ({source.name}/)"
    from exporters.triton import write_triton_repository

    repo = write_triton_repository(source, build / "deploy", name="llm", backend="onnxruntime", overwrite=True)
    check = f"validated with {repo.validated_with}" if repo.validated_with else "config.pbtxt not validated"
    return f"Triton repository {build / 'deploy'} (model llm from {source.name}/, onnxruntime backend; {check})"


def run_bench(build: Path, options: BuildOptions, progress=None) -> None:
    from toolchain.app.bench import bench_build

    # the build's own bench stays short (two prompt lengths); `toolchain bench` runs the full sweep
    bench_build(build, build / "reports" / "latency", provider=options.provider, prompts="128,512",
                quantized=options.quantize is not None, progress=progress)


def run_eval(build: Path, options: BuildOptions, progress=None) -> None:
    """Perplexity of the source model and of the compressed one, same protocol."""
    from toolchain.data.text import eval_windows, load_text
    from runtime.evaluate import perplexity, write_report
    from runtime.loading import load_causal_lm
    from toolchain.data.sources import load_hf_model, resolve_model

    dense, tokenizer = load_hf_model(resolve_model(options.model))
    windows = eval_windows(tokenizer, load_text(options.eval, "test"), seqlen=512, max_windows=EVAL_WINDOWS)
    where = {"dataset": options.eval, "split": "test"}
    dense_ppl = perplexity(dense, tokenizer, windows, seqlen=512) | where
    del dense
    compressed, _ = load_causal_lm(model_dir(build))
    compressed_ppl = perplexity(compressed, tokenizer, windows, seqlen=512) | where
    out = build / "reports" / "eval"
    write_report(out, {"model": options.model, "perplexity": dense_ppl}, stem="dense")
    write_report(out, {"model": f"{options.model} ({options.method})", "perplexity": compressed_ppl}, stem="compressed")


def _compress_key(o: BuildOptions) -> dict:
    # how the model is streamed and where activations wait change no output byte: not part of the key
    key = asdict(o.compress_options())
    for name in ("stream", "offload_activations"):
        key.pop(name)
    if o.rotate == "none":  # not rotating writes what builds from before --rotate wrote: same key, they resume
        for name in ("rotate", "rotate_heads"):
            key.pop(name)
    if "modegpt" not in o.method:  # the MoDeGPT rounding changes nothing SliceGPT writes
        key.pop("modegpt_multiple")
    return key


def _quantize_key(o: BuildOptions) -> dict:
    # every quantizer setting, defaults included: a changed default must not pass for a current output
    key = asdict(o.quantize_options()) | {"calib": o.calib}
    key.pop("overwrite")
    if o.quant_algorithm == "gptq":  # GPTQ's codes depend on its calibration windows
        key |= {"nsamples": o.nsamples, "seqlen": o.seqlen}
    return key


STAGES = [
    Stage("compress", "sliced", run_compress, _compress_key),
    Stage("recover", RECOVERED, run_recover, lambda o: asdict(o.recover_options()) | {"device": o.device},
          reads=(COMPRESSED,), enabled=lambda o: o.recover is not None),
    Stage("export", "onnx", run_export, _export_key, reads=MODEL_DIRS, targets=("onnx", "trt")),
    Stage("trt_bundle", "trt", run_trt_bundle, lambda o: {}, reads=MODEL_DIRS, targets=("trt",)),
    Stage("validate", "reports/parity", run_validate, lambda o: {"dtype": o.dtype, "provider": o.provider},
          reads=(*MODEL_DIRS, "onnx"), targets=("onnx", "trt")),
    Stage("quantize", "quantized", run_quantize,
          _quantize_key,  # reads the torch model too: GPTQ calibrates the model the export came from
          reads=(*MODEL_DIRS, "onnx"), targets=("onnx",), enabled=lambda o: o.quantize is not None),
    Stage("deploy", "deploy", run_deploy, lambda o: {"deploy": o.deploy, "source": o.quantize or "onnx"},
          reads=("onnx", "quantized"), targets=("onnx", "trt"), enabled=lambda o: o.deploy is not None),
    Stage("bench", "reports/latency", run_bench, lambda o: {"provider": o.provider, "quantize": o.quantize},
          reads=(*MODEL_DIRS, "onnx", "quantized"), targets=("onnx", "trt"), enabled=lambda o: o.bench),
    Stage("eval", "reports/eval", run_eval, lambda o: {"eval": o.eval}, reads=MODEL_DIRS,
          enabled=lambda o: o.eval is not None),
]


# --- manifest -----------------------------------------------------------------------------------


def hash_outputs(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by path relative to the build dir's parent layout. The
    model card at the top is left out: it is rewritten from the reports after every build, so rewriting
    it must not make the stage look stale."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root) != Path(CARD)}


def read_manifest(build: Path) -> dict:
    path = build / MANIFEST
    if not path.exists():
        return {"schema": SCHEMA, "stages": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OutputPathError(f"{path} is corrupted ({err}); rebuild with --force") from None
    if manifest.get("schema") != SCHEMA:
        raise OutputPathError(f"{path} is not a toolchain build manifest; choose another --out")
    return manifest


def stage_key(stage: Stage, options: BuildOptions, manifest: dict) -> str:
    upstream = {}
    for name, record in manifest["stages"].items():
        if record.get("output") in stage.reads:
            upstream[record["output"]] = record.get("outputs", {})
    payload = json.dumps({"stage": stage.name, "options": stage.options(options), "inputs": upstream},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def is_current(build: Path, stage: Stage, key: str, manifest: dict) -> bool:
    record = manifest["stages"].get(stage.name)
    if not record or record.get("status") != "done" or record.get("key") != key:
        return False
    root = build / stage.output
    return root.is_dir() and hash_outputs(root) == record.get("outputs")


def in_pipeline_order(records: dict) -> dict:
    order = [stage.name for stage in STAGES]
    return dict(sorted(records.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def prepare_build_dir(build: Path) -> None:
    if build.exists() and not build.is_dir():
        raise OutputPathError(f"--out {build} is a file; choose a directory")
    if build.is_dir() and any(p.name != LOCK_FILE for p in build.iterdir()) and not (build / MANIFEST).exists():
        raise OutputPathError(f"--out {build} exists and is not a toolchain build; choose a new or empty directory")
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create --out {build}: {err.strerror}; choose a writable location") from None


def clear_build_dir(build: Path, force: bool) -> None:
    """Under the build lock: --force empties the dir; temp dirs of a killed stage are removed."""
    if force:
        for entry in build.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for stale in build.rglob(".*.tmp-*"):  # leftovers of a killed stage: never mistaken for outputs
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def build(options: BuildOptions, out: str | Path, force: bool = False,
          on_stage: Callable[[str, str], None] | None = None, progress: Callable | None = None) -> dict:
    """Run (or resume) every stage the target needs. `on_stage(name, event)`: 'skip'|'start'|'done'."""
    options.validate()
    build_dir = Path(out)
    prepare_build_dir(build_dir)
    with exclusive_dir(build_dir):  # one build per directory: a second one fails at once, this one untouched
        clear_build_dir(build_dir, force)
        manifest = run_stages(build_dir, options, on_stage, progress)
        write_build_cards(build_dir)  # after the last stage: every result the cards report is in
        return manifest


def run_stages(build_dir: Path, options: BuildOptions, on_stage, progress) -> dict:
    manifest = read_manifest(build_dir)
    manifest.update(schema=SCHEMA, toolchain_version=__version__, options=asdict(options))
    if options.recover is None:
        drop_stale_recovery(build_dir, manifest)
    for stage in STAGES:
        if options.target not in stage.targets or not stage.enabled(options):
            continue
        key = stage_key(stage, options, manifest)
        if is_current(build_dir, stage, key, manifest):
            on_stage and on_stage(stage.name, "skip")
            continue
        on_stage and on_stage(stage.name, "start")
        manifest["stages"][stage.name] = {"status": "running", "output": stage.output, "key": key}
        manifest["stages"] = in_pipeline_order(manifest["stages"])  # a stage added by a rerun goes to its place
        write_json(build_dir / MANIFEST, manifest)
        start = time.perf_counter()
        try:
            note = stage.run(build_dir, options, progress)
        except BaseException as err:
            manifest["stages"][stage.name]["status"] = "failed"
            write_json(build_dir / MANIFEST, manifest)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise OutputPathError(f"no space left on the device while writing {build_dir / stage.output}; "
                                      "free some space or choose another --out, then run the same command "
                                      "again to resume") from None
            raise
        manifest["stages"][stage.name] = {
            "status": "done", "output": stage.output, "key": key, "options": stage.options(options),
            "seconds": round(time.perf_counter() - start, 2), "versions": library_versions(),
            "outputs": hash_outputs(build_dir / stage.output),
        }
        if note:
            manifest["stages"][stage.name]["note"] = note
        write_json(build_dir / MANIFEST, manifest)
        on_stage and on_stage(stage.name, "done")
    return manifest
