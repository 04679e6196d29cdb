"""`toolchain doctor`: installed versions against the ranges the package declares."""

from __future__ import annotations

from importlib import metadata

from typer.testing import CliRunner

from toolchain.app.cli import app
from toolchain.core import versions


def _declared(name: str) -> str:
    for line in metadata.requires(versions.DISTRIBUTION):
        if line.split(";")[0].replace(" ", "").startswith(name):
            return line
    raise AssertionError(f"{name} is not declared")


def test_every_declared_dependency_is_checked_with_its_declared_range():
    checks = {check.name: check for check in versions.dependency_checks()}
    assert {"torch", "transformers", "onnxruntime", "pytest"} <= set(checks)
    assert checks["transformers"].extra is None and checks["pytest"].extra == "test"
    assert checks["transformers"].tested and checks["transformers"].tested in _declared("transformers").replace(" ", "")
    assert checks["transformers"].installed == metadata.version("transformers")


def test_doctor_passes_on_the_locked_install():
    result = CliRunner().invoke(app, ["doctor", "--strict"])
    assert result.exit_code == 0, result.output
    assert "transformers" in result.output and "warning" not in result.output


def test_doctor_warns_when_a_version_is_outside_the_tested_range(monkeypatch):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: "99.0" if name == "transformers" else real(name))
    check = next(c for c in versions.dependency_checks() if c.name == "transformers")
    assert check.status == "outside" and check.problem

    relaxed = CliRunner().invoke(app, ["doctor"])
    assert relaxed.exit_code == 0, relaxed.output
    assert "warning: transformers 99.0 is outside the tested range" in " ".join(relaxed.output.split())

    strict = CliRunner().invoke(app, ["doctor", "--strict"])
    assert strict.exit_code == 1, strict.output


def test_missing_core_dependency_is_a_problem_but_a_missing_extra_is_not(monkeypatch):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version",
                        lambda name: None if name in ("onnx", "lm-eval") else real(name))
    checks = {c.name: c for c in versions.dependency_checks()}
    assert checks["onnx"].status == "missing" and checks["onnx"].problem
    assert checks["lm-eval"].status == "missing" and not checks["lm-eval"].problem


def test_library_versions_records_what_made_an_artifact():
    recorded = versions.library_versions()
    assert recorded["transformers"] == metadata.version("transformers") and "python" in recorded
