"""Installed versions of the toolchain's dependencies, checked against the ranges the package declares.

The ranges come from the installed package's own metadata (pyproject.toml's `dependencies` and
extras), so there is one list of tested ranges, not a copy here."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from toolchain import __version__

DISTRIBUTION = "toolchain"
RECORDED = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "peft", "tensorrt")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict:
    """What a build manifest or a benchmark report records about the software that made it."""
    versions = {"toolchain": __version__, "python": platform.python_version()}
    for name in RECORDED:
        if (version := installed_version(name)) is not None:
            versions[name] = version
    return versions


@dataclass(frozen=True)
class DependencyCheck:
    name: str
    tested: str  # the declared range, e.g. ">=5.0,<5.25"
    extra: str | None  # None for a core dependency, else the extras that ask for it ("test, deploy")
    installed: str | None

    @property
    def status(self) -> str:
        """ok | missing | outside (installed, but not in the tested range)."""
        if self.installed is None:
            return "missing"
        try:
            version = Version(self.installed)
        except InvalidVersion:
            return "outside"
        return "ok" if Requirement(f"{self.name}{self.tested}").specifier.contains(version, prereleases=True) \
            else "outside"

    @property
    def problem(self) -> bool:
        """A core dependency missing, or anything installed outside its tested range."""
        return self.status == "outside" or (self.status == "missing" and self.extra is None)


def _extra_of(requirement: Requirement) -> str | None:
    if requirement.marker is None:
        return None
    for extra in metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []:
        if requirement.marker.evaluate({"extra": extra}) and not requirement.marker.evaluate({"extra": ""}):
            return extra
    return None


def dependency_checks() -> list[DependencyCheck]:
    """One check per declared dependency, in the order pyproject.toml lists them; a package that
    several extras ask for is one row naming them all."""
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []  # running from a source tree that was never installed: nothing declared to check
    rows: dict[str, tuple[str, list[str | None]]] = {}
    for line in declared:
        requirement = Requirement(line)
        extra = _extra_of(requirement)
        if requirement.marker is not None and extra is None and not requirement.marker.evaluate():
            continue  # a dependency for another platform or Python
        tested, extras = rows.setdefault(requirement.name, (str(requirement.specifier), []))
        extras.append(extra)
    return [DependencyCheck(name, tested, None if None in extras else ", ".join(extras), installed_version(name))
            for name, (tested, extras) in rows.items()]
