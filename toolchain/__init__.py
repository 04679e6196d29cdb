"""Compress LLMs (SliceGPT, MoDeGPT) into dense smaller HF-style models and ship them to ONNX/TensorRT.

The package is layered; imports point down only (checked by the import contract in pyproject.toml):
core (no torch) → model → data → compress → runtime → exporters → analysis → app. Importing
`toolchain` itself loads nothing heavy; `import toolchain.model.modeling` registers the canonical model with
transformers' Auto classes, so a saved model loads with `AutoModelForCausalLM.from_pretrained(dir)`
without trust_remote_code.

The Python API (toolchain.app.api) is reachable from here: `toolchain.build(...)`, `toolchain.slice(...)`,
`toolchain.export(...)`, `toolchain.validate(...)`, `toolchain.bench(...)`, `toolchain.recover(...)`. It
is imported on first use, so `import toolchain` stays light. The errors it raises (one class per
kind of user mistake, the ones the CLI prints as one line) are here too: `toolchain.InvalidOptionError`, ...
"""

__version__ = "0.1.0"

from toolchain.core.errors import (  # noqa: I001  (the errors the API raises, at the package root)
    ArtifactError, BackendUnavailableError, DataError, InvalidOptionError, ModelNotFoundError, NonFiniteError,
    OutputPathError, ToolchainError, UnsafeWeightsError, UnsupportedArchitectureError)

# name here -> name in toolchain.app.api; `slice` as the command is called: `toolchain.compress` is the
# package of compression methods, and importing a subpackage sets that attribute on this module
API = {"build": "build", "slice": "compress", "recover": "recover", "export": "export", "validate": "validate",
       "bench": "bench", **{name: name for name in ("Built", "Compressed", "Recovered", "Exported", "Validated",
                                                     "Benchmarked")}}
__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "Benchmarked",
    "Built",
    "Compressed",
    "DataError",
    "Exported",
    "InvalidOptionError",
    "ModelNotFoundError",
    "NonFiniteError",
    "OutputPathError",
    "Recovered",
    "ToolchainError",
    "UnsafeWeightsError",
    "UnsupportedArchitectureError",
    "Validated",
    "__version__",
    "bench",
    "build",
    "export",
    "recover",
    "slice",
    "validate",
]


def __getattr__(name: str):
    if name in API:
        from toolchain.app import (
            api,  # the app layer, loaded on first use (the contract allows this one import)
        )

        return getattr(api, API[name])
    raise AttributeError(f"module 'toolchain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
