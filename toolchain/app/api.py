"""The Python API: the CLI's commands as functions, for notebooks and scripts.

    import toolchain
    built = toolchain.build("smollm2-135m", "builds/s30", slice=0.3, target="onnx")
    built.reports["parity"]["passed"], built.onnx_dir

Each function calls the same stage function its command calls and takes the same options, spelled as
the command's flags with underscores (`--target-ratio` -> `target_ratio=`, `--eval` -> `eval=`);
the compression and recovery options are the fields of CompressOptions / RecoverOptions, the build's
are BuildOptions'. A user mistake raises the ToolchainError subclass the CLI prints as one line
(InvalidOptionError for a bad or unknown option, ModelNotFoundError, OutputPathError, ...). Results
are dataclasses holding the output paths and the JSON reports already loaded.

Importing this module loads no torch; each call imports what its stage needs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from toolchain.core.build_reports import build_reports, read_report
from toolchain.core.build_dirs import model_dir as build_model_dir
from toolchain.core.errors import InvalidOptionError

__all__ = ["Benchmarked", "Built", "Compressed", "Exported", "Recovered", "Validated", "bench", "build", "compress",
           "export", "recover", "validate"]


@dataclass(frozen=True)
class Compressed:
    path: Path  # the compressed model dir (loads with AutoModelForCausalLM after `import toolchain.model.modeling`)
    report: dict  # compression_report.json
    seconds: float

    @property
    def parameters(self) -> dict:
        """dense / compressed parameter counts by part, kept_fraction, compression."""
        return self.report["parameters"]


@dataclass(frozen=True)
class Recovered:
    path: Path  # the recovered model dir
    report: dict  # recover_report.json


@dataclass(frozen=True)
class Exported:
    path: Path  # the export dir
    model_file: Path  # model.onnx
    config: dict  # export_config.json: I/O names, dims, per-layer shapes
    report: dict  # export_report.json: graph kind, op counts, checks


@dataclass(frozen=True)
class Validated:
    passed: bool
    report: dict  # parity.json
    json_path: Path
    markdown_path: Path


@dataclass(frozen=True)
class Benchmarked:
    path: Path  # the report dir
    report: dict  # latency.json
    files: dict[str, Path]  # latency.json, latency.md and the plots


@dataclass(frozen=True)
class Built:
    path: Path  # the build dir
    manifest: dict  # manifest.json: stages, options, versions, output hashes
    reports: dict[str, dict] = field(repr=False)  # by name: compression, parity, latency, ... (build_reports)

    @property
    def model_dir(self) -> Path:
        """The build's torch model: recovered/ when recovery ran, else sliced/."""
        return build_model_dir(self.path)

    @property
    def onnx_dir(self) -> Path | None:
        return self.path / "onnx" if (self.path / "onnx" / "model.onnx").is_file() else None

    @property
    def quantized_dir(self) -> Path | None:
        return self.path / "quantized" if (self.path / "quantized" / "model.onnx").is_file() else None

    @property
    def deploy_dir(self) -> Path | None:
        return self.path / "deploy" if (self.path / "deploy").is_dir() else None

    @property
    def passed(self) -> bool | None:
        """Whether the export matched the torch model (None when the build has no parity report)."""
        parity = self.reports.get("parity")
        return None if parity is None else bool(parity["passed"])


def _options(cls, given: dict, **fixed):
    """`cls(**fixed, **given)`, an unknown name refused as the CLI refuses an unknown flag."""
    known = {f.name for f in fields(cls) if f.init}
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {cls.__name__}'s fields"
            raise InvalidOptionError(f"unknown option {name!r}{hint}")
    return cls(**fixed, **given)


def compress(model: str, out: str | Path, *, overwrite: bool = False, progress: Callable | None = None,
             **options) -> Compressed:
    """`toolchain slice` (`toolchain.slice` at the package root): compress `model` (short name, hub id, checkpoint dir or .gguf) into the new
    model dir `out`. `options`: CompressOptions' fields (slice=, method=, calib=, nsamples=, ...)."""
    from toolchain.app.model_card import write_model_card
    from toolchain.compress.options import CompressOptions
    from toolchain.compress.stage import compress_to_dir

    result = compress_to_dir(_options(CompressOptions, options, model=model), out, overwrite=overwrite,
                             progress=progress)
    write_model_card(result.out_dir)
    return Compressed(Path(result.out_dir), result.report, result.seconds)


def recover(model_dir: str | Path, out: str | Path, *, device: str = "auto", progress: Callable | None = None,
            **options) -> Recovered:
    """`toolchain recover`: recovery training of a compressed model dir into `out`. `options`:
    RecoverOptions' fields; `recover=` picks the method (default: distill, as the command)."""
    from toolchain.app.model_card import write_model_card
    from toolchain.compress.options import RecoverOptions, check_device_name
    from toolchain.compress.recover import recover_to_dir

    check_device_name(device)
    recover_options = _options(RecoverOptions, options | {"recover": options.get("recover", "distill")})
    result = recover_to_dir(model_dir, out, recover_options, device=device, progress=progress)
    write_model_card(result.out_dir)
    return Recovered(Path(result.out_dir), result.report)


def export_source(model: str | Path) -> str:
    """What `toolchain export` exports for MODEL: a build dir's torch model, else MODEL itself."""
    built = build_model_dir(Path(model).expanduser())
    return str(built) if (built / "config.json").is_file() else str(model)


def export(model: str | Path, out: str | Path, *, dtype: str = "fp32", optimize: str = "fast",
           external_data: bool = False, exporter: str = "dynamo", overwrite: bool = False) -> Exported:
    """`toolchain export`: an ONNX graph with KV cache (optimum / onnxruntime-genai I/O names) of a
    model dir, build dir (its model), HF checkpoint or hub id, into the new dir `out`."""
    from exporters.onnx import ExportOptions, export_onnx
    from toolchain.app.model_card import write_model_card

    result = export_onnx(export_source(model), out, ExportOptions(dtype=dtype, optimize=optimize,
                                                                  external_data=external_data, exporter=exporter,
                                                                  overwrite=overwrite))
    write_model_card(result.out_dir)
    return Exported(Path(result.out_dir), Path(result.model_path), result.config, result.report)


def validate(*paths: str | Path, dtype: str | None = None, provider: str = "cpu",
             report: str | Path | None = None) -> Validated:
    """`toolchain validate`: parity of an export against its torch model — a build dir, or REFERENCE
    and CANDIDATE. A failed comparison is a result (`passed` False), not an exception."""
    from runtime.validate import validate as run_validate

    result = run_validate(list(paths), dtype=dtype, provider=provider, report_dir=report)
    return Validated(result.passed, result.report, result.json_path, result.markdown_path)


def bench(build_dir: str | Path, *, out: str | Path | None = None, progress: Callable | None = None,
          **options) -> Benchmarked:
    """`toolchain bench`: latency of a build's compressed model next to its dense source. `options`:
    the command's (prompts="128,512", batches="1,8", steps=, warmup=, repeats=, context=, max_prompt=,
    dense=, torch_only=, threads=, quantized=, provider=)."""
    import inspect

    from toolchain.app.bench import bench_build

    known = set(inspect.signature(bench_build).parameters) - {"build_dir", "out_dir", "progress"}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise InvalidOptionError(f"unknown bench option {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                         else f"; choose from {', '.join(sorted(known))}"))
    build_dir = Path(build_dir)
    out = Path(out) if out is not None else build_dir / "reports" / "latency"
    result = bench_build(build_dir, out, progress=progress, **options)
    return Benchmarked(out, read_report(result.json_path), dict(result.paths))  # the report as written


def build(model: str, out: str | Path, *, force: bool = False, progress: Callable | None = None,
          on_stage: Callable[[str, str], None] | None = None, **options) -> Built:
    """`toolchain build`: compress -> (recover) -> export -> validate -> (quantize, deploy) -> bench ->
    (eval) in the build dir `out`, resuming what is current. `options`: BuildOptions' fields (slice=,
    target=, dtype=, bench=, eval=, quantize=, deploy=, recover=, ...). `on_stage(name, event)` is
    told 'start' | 'done' | 'skip'. Raises ParityError when the export misses the parity bar."""
    from toolchain.app.pipeline import BuildOptions
    from toolchain.app.pipeline import build as run_build

    manifest = run_build(_options(BuildOptions, options, model=model), out, force=force, on_stage=on_stage,
                         progress=progress)
    return Built(Path(out), manifest, build_reports(out))
