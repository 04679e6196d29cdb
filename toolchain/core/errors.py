"""One exception type per kind of user mistake. The message names the problem and the fix.

The CLI turns any ToolchainError into a single line and exit code 2; everything else is a bug.
"""


class ToolchainError(Exception):
    """Base class: a problem the user can fix. `str(err)` is the whole message."""

    exit_code = 2


class ModelNotFoundError(ToolchainError):
    """--model names nothing we can load (no dir, no file, not cached, no network)."""


class UnsupportedArchitectureError(ToolchainError):
    """The checkpoint's architecture has no adapter."""


class InvalidOptionError(ToolchainError):
    """A CLI/API option is out of range or of the wrong type."""


class DataError(ToolchainError):
    """Calibration or evaluation text is missing, unknown, unreadable or too short."""


class UnsafeWeightsError(ToolchainError):
    """Weights in a pickle-based format (never loaded), or corrupted safetensors."""


class OutputPathError(ToolchainError):
    """The output location cannot be used (exists and is not ours, read-only, escapes --out)."""


class BackendUnavailableError(ToolchainError):
    """A requested runtime/provider/accelerator (CUDA, TensorRT, an ORT provider) is not installed here."""


class ArtifactError(ToolchainError):
    """A build artifact (ONNX file, build dir, report) is missing or corrupted."""


class NonFiniteError(ToolchainError):
    """NaN or Inf in source weights, in calibration statistics, or in a model about to be exported."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type name: third-party
    errors (pybind, protobuf, TensorRT) can carry pages of context that would bury our one-line message."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
