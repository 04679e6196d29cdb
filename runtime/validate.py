"""The `validate` stage: find the two artifacts, run the parity harness, write parity.{json,md}.

A build dir holds its torch model (`sliced/`, or `recovered/` after recovery: toolchain.core.build_dirs),
the reference, and `onnx/` (the export, the candidate);
two explicit paths are taken as (reference, candidate), each a torch model dir or an ONNX file/dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolchain.core.build_dirs import model_dir
from toolchain.core.errors import ArtifactError, InvalidOptionError, ModelNotFoundError
from toolchain.core.reports import write_report

from runtime.parity import TOLERANCES, check_parity, to_markdown
from runtime.sessions import Session, open_session

BUILD_REFERENCE, BUILD_CANDIDATE = "sliced", "onnx"


@dataclass
class Validation:
    report: dict
    json_path: Path
    markdown_path: Path

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def resolve_pair(paths: list[str | Path]) -> tuple[Path, Path, Path | None]:
    """(reference, candidate, build dir or None)."""
    paths = [Path(p).expanduser() for p in paths]
    for path in paths:
        if not path.exists():
            raise ModelNotFoundError(f"{path} does not exist; pass a build dir or two model paths that exist")
    if len(paths) == 2:
        return paths[0], paths[1], None
    if len(paths) != 1:
        raise InvalidOptionError(f"validate takes a build dir or two model paths (reference, candidate); got {len(paths)}")
    build = paths[0]
    reference = model_dir(build)
    missing = [sub for sub in (reference.name, BUILD_CANDIDATE) if not (build / sub).is_dir()]
    if not build.is_dir() or missing:
        raise ArtifactError(f"{build} is not a build dir (missing {', '.join(missing) or 'everything'}: it needs "
                            f"{BUILD_REFERENCE}/ with the torch model and {BUILD_CANDIDATE}/ with the export); run "
                            "`toolchain build`, or pass two model paths")
    return reference, build / BUILD_CANDIDATE, build


def validate(paths: list[str | Path], dtype: str | None = None, provider: str = "cpu",
             report_dir: str | Path | None = None) -> Validation:
    """Parity of candidate vs reference; the report files are written whether it passes or not."""
    if dtype is not None and dtype not in TOLERANCES:
        raise InvalidOptionError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(TOLERANCES)}")
    reference_path, candidate_path, build = resolve_pair(paths)
    candidate = open_session(candidate_path, provider=provider, name=_label(candidate_path, provider))
    reference = open_session(reference_path, provider="cpu", name=_label(reference_path, "cpu"))
    _check_compatible(reference, candidate, reference_path, candidate_path)
    dtype = dtype or ("fp16" if candidate.kv_dtype.itemsize == 2 else "fp32")
    report = check_parity(reference, candidate, dtype, vocab_size=reference.vocab_size)
    report["paths"] = {"reference": str(reference_path), "candidate": str(candidate_path)}

    out = Path(report_dir) if report_dir is not None else (build / "reports" if build else Path("reports"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"cannot create report dir {out} ({err.strerror}); pass a writable --report") from err
    paths = write_report(out, report, to_markdown, "parity")
    return Validation(report, paths["json"], paths["markdown"])


def _label(path: Path, provider: str) -> str:
    is_onnx = path.suffix == ".onnx" or (path / "model.onnx").is_file()
    return f"onnxruntime-{provider}" if is_onnx else "torch"


def _check_compatible(reference: Session, candidate: Session, ref_path: Path, cand_path: Path) -> None:
    ref = (reference.vocab_size, [(s.key_dim, s.value_dim, s.heads) for s in reference.kv_shapes])
    cand = (candidate.vocab_size, [(s.key_dim, s.value_dim, s.heads) for s in candidate.kv_shapes])
    if ref != cand:
        raise ArtifactError(f"{cand_path} is not an export of {ref_path}: vocab/KV layout differ "
                            f"({ref[0]} vocab, {len(ref[1])} layers vs {cand[0]} vocab, {len(cand[1])} layers, or "
                            "different head dims); pass the matching pair")
