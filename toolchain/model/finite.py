"""Refuse NaN/Inf early: one NaN in a source weight spreads through the rotations into most of the
compressed weights, and a model full of NaN still saves, exports and "passes" a size check."""

from __future__ import annotations

from toolchain.core.errors import NonFiniteError


def count_non_finite(tensor) -> int:
    return int((~tensor.isfinite()).sum()) if tensor.is_floating_point() else 0


def require_finite_weight(name: str, tensor, where: str) -> None:
    bad = count_non_finite(tensor)
    if bad:
        raise NonFiniteError(f"{where} {name} has {bad} NaN/Inf value(s) of {tensor.numel()}; "
                             "the checkpoint is corrupted or was saved from a diverged run: use an intact copy")


def require_finite_model(model, where: str) -> None:
    """Every parameter and buffer of `model` (a torch module) is finite."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta":
            require_finite_weight(name, tensor, where)


def require_finite_statistics(statistics, what: str, batches=None, masks=None) -> None:
    """`statistics` (accumulated over calibration `batches`) is finite; otherwise name the first batch
    whose activations are not."""
    if not count_non_finite(statistics):
        return
    culprit = ""
    if batches is not None:
        for index, (x, mask) in enumerate(zip(batches, masks)):
            if count_non_finite(x[mask.bool()]):
                culprit = f" (calibration batch {index} is the first with NaN/Inf activations)"
                break
    raise NonFiniteError(f"calibration statistics of {what} are not finite{culprit}; the model overflows on this "
                         "text: calibrate in float32 (--device cpu) or choose other calibration text")
