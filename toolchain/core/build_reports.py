"""The JSON reports a build's stages write, found and loaded in one place (the Python API's results,
the model cards and the build's headline read them from here). Only files that exist are returned; nothing is computed."""

from __future__ import annotations

import json
from pathlib import Path

from toolchain.core.build_dirs import COMPRESSED, RECOVERED, model_dir
from toolchain.core.errors import ArtifactError

COMPRESSION_REPORT = "compression_report.json"
RECOVER_REPORT = "recover_report.json"
EXPORT_CONFIG, EXPORT_REPORT = "export_config.json", "export_report.json"
QUANTIZE_REPORT = "quantize_report.json"

# report name -> its path under the build dir
BUILD_REPORTS = {
    "compression": f"{COMPRESSED}/{COMPRESSION_REPORT}",
    "recovery": f"{RECOVERED}/{RECOVER_REPORT}",
    "export": f"onnx/{EXPORT_REPORT}",
    "export_config": f"onnx/{EXPORT_CONFIG}",
    "parity": "reports/parity/parity.json",
    "quantize": f"quantized/{QUANTIZE_REPORT}",
    "latency": "reports/latency/latency.json",
    "eval_dense": "reports/eval/dense.json",
    "eval_compressed": "reports/eval/compressed.json",
}


def read_report(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is corrupted ({err}); rerun the stage that writes it") from None


def build_reports(build_dir: str | Path) -> dict[str, dict]:
    """Every report the build dir holds, by name (BUILD_REPORTS); recovery only while recovered/ is the
    build's model."""
    build = Path(build_dir)
    found = {name: read_report(build / rel) for name, rel in BUILD_REPORTS.items() if (build / rel).is_file()}
    if model_dir(build).name != RECOVERED:
        found.pop("recovery", None)
    return found


def dir_reports(directory: str | Path) -> dict[str, dict]:
    """The reports a single model or export dir carries itself (outside a build)."""
    directory = Path(directory)
    names = {"compression": COMPRESSION_REPORT, "recovery": RECOVER_REPORT, "export": EXPORT_REPORT,
             "export_config": EXPORT_CONFIG, "quantize": QUANTIZE_REPORT}
    return {name: read_report(directory / file) for name, file in names.items() if (directory / file).is_file()}
