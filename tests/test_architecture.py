"""The layer contract: imports point down only (import-linter reads it from pyproject.toml), and the
commands that need no model load no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnxruntime", "onnx")


def test_imports_point_down_only():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout, proc.stdout[-2000:]


def _modules_loaded_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["doctor", "--help"], ["trt", "--help"]])
def test_help_loads_no_heavy_library(argv):
    code = ("from toolchain.app.cli import app\n"
            f"try:\n    app({argv!r}, prog_name='toolchain')\nexcept SystemExit:\n    pass")
    assert _modules_loaded_by(code) == []


def test_core_and_package_root_load_no_heavy_library():
    code = "import toolchain, toolchain.core.errors, toolchain.core.fileio, toolchain.core.versions"
    assert _modules_loaded_by(code) == []


def test_plan_reads_a_config_without_torch():
    # a known short name: the planner needs only the config's numbers
    code = ("from toolchain.app.cli import app\n"
            "try:\n    app(['plan', '--model', 'smollm2-135m', '--json'], prog_name='toolchain')\n"
            "except SystemExit as exit:\n    assert not exit.code, exit.code")
    assert "torch" not in _modules_loaded_by(code)
