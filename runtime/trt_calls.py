"""TensorRT reports most failures through return values (False, -1, None, a list of names), not
exceptions, and logs the reason only to its logger: an unchecked `set_input_shape` surfaces later as
an unrelated error in `execute_async_v3` or as garbage outputs. Every such call goes through `check`,
which turns a failure into one TensorRTCallError naming the call, its tensor and the likely cause."""

from __future__ import annotations

from toolchain.core.errors import ArtifactError


class TensorRTCallError(ArtifactError):
    """A TensorRT API call reported failure; the message names the call, the tensor and the fix."""


def check(result, call: str, cause: str):
    """`result` of TensorRT `call` (e.g. "set_input_shape('input_ids', (2, 12))"); returns it when it
    signals success, else raises. Failure is False, None, a negative index, or a non-empty list of
    unresolved tensor names (infer_shapes)."""
    failed = (result is None or result is False or (isinstance(result, int) and not isinstance(result, bool)
                                                     and result < 0) or (isinstance(result, (list, tuple)) and result))
    if failed:
        got = "" if result is None or result is False else f" (returned {result!r})"
        raise TensorRTCallError(f"TensorRT {call} failed{got}: {cause}; the TensorRT log above has the details")
    return result
