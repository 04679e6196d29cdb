"""The calibration batches as they flow through the model being sliced: the residual entering the
current position (in memory or as files), the masks and positions, and one step of the residual
through the blocks at a position."""

from __future__ import annotations

from pathlib import Path

import torch

from toolchain.model.modeling import attention_bias
from toolchain.compress import rotation
from toolchain.compress.slicegpt.weights import WeightStore


class ActivationStore:
    """One tensor per calibration batch (the residual stream), kept on the compute device or, with a
    directory, as one safetensors file per batch (read back when indexed)."""

    def __init__(self, device, directory: Path | None = None):
        import tempfile

        self.device = torch.device(device)
        self._tensors: list[torch.Tensor | None] = []
        self.directory = None if directory is None else Path(tempfile.mkdtemp(prefix="activations-",
                                                                                dir=Path(directory)))

    def __len__(self) -> int:
        return len(self._tensors)

    def _path(self, index: int):
        return self.directory / f"batch-{index:05d}.safetensors"

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.directory is None:
            return self._tensors[index]
        from safetensors.torch import load_file

        return load_file(self._path(index), device=str(self.device))["h"]

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if self.directory is None:
            self._tensors[index] = tensor
            return
        from safetensors.torch import save_file

        save_file({"h": tensor.detach().to("cpu").contiguous()}, self._path(index))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def append(self, tensor: torch.Tensor) -> None:
        self._tensors.append(None)
        self[len(self._tensors) - 1] = tensor

    def close(self) -> None:
        """Forget every batch (and delete the files)."""
        import shutil

        self._tensors = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class Calibration:
    """Calibration batches: masks and positions (small, on the compute device) and the residual entering
    the current position (an ActivationStore). RoPE tables and attention biases are rebuilt per batch
    when needed rather than kept (a bias is batch x seq² values)."""

    def __init__(self, model, device, offload=None):
        self.model, self.device = model, device
        self.masks: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.residuals = ActivationStore(device, offload)

    def __len__(self) -> int:
        return len(self.masks)

    def batch(self, index: int):
        """(mask, rope, attention bias) of batch `index`."""
        mask, dtype = self.masks[index], self.model.dtype
        rope = self.model.rope(self.positions[index], dtype)
        return mask, rope, attention_bias(mask, mask.shape[1], dtype, self.model.config.sliding_window)


def embed_calibration(model, input_ids, attention_mask, options, weights: WeightStore,
                       offload=None) -> Calibration:
    """Open the embedding and compute the residual at position 0 for every batch (the embedding
    stays open: position 0's writers are the embedding)."""
    device = torch.device(options.device)
    weights.open_embedding(model, device)
    cal = Calibration(model, device, offload)
    for start in range(0, len(input_ids), options.batch_size):
        ids = input_ids[start:start + options.batch_size].to(device)
        mask = attention_mask[start:start + options.batch_size].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cal.masks.append(mask)
        cal.positions.append(positions)
        cal.residuals.append(model.hidden_input(ids, positions))
    return cal


def next_residual(model, position, h, basis, rope, bias) -> torch.Tensor:
    """Residual at position+1 in the original basis: shortcut back to D dims plus the blocks at
    `position`, whose writers are not rotated yet."""
    index, kind = rotation._layer_and_kind(model, position)
    layer = model.layers[index]
    norm = rotation.norm_at(model, position)
    x = norm(h)
    carried = (h.to(torch.float64) @ basis.T).to(h.dtype)
    if kind == "attn":
        return carried + layer.attn(x, rope, bias, None)
    if kind == "mlp":
        return carried + layer.mlp(x)
    return carried + layer.attn(x, rope, bias, None) + layer.mlp(x)
