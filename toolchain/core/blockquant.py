"""Block-wise asymmetric weight quantization, the data type MatMulNBits stores.

A weight as nn.Linear keeps it, W [N=out, K=in], is cut into blocks of `block_size` consecutive
values along K; each block gets one fp32 scale and one unsigned zero point, and each value the
code q = clamp(round(w / scale) + zp, 0, 2**bits - 1), so w ≈ (q - zp) * scale. K need not be a
multiple of the block: the last block is short here, and the ONNX writer pads it with zeros.

numpy only, so the torch-side algorithms (GPTQ) and the ONNX writer share it without either
importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    codes: np.ndarray  # uint8 [N, K], each in 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, n_blocks]
    block_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.codes.shape[1] // self.block_size)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: (code - zero point) * scale, block by block."""
        n, k = self.codes.shape
        scale = np.repeat(self.scales, self.block_size, axis=1)[:, :k]
        zero = np.repeat(self.zero_points, self.block_size, axis=1)[:, :k].astype(np.float32)
        return ((self.codes.astype(np.float32) - zero) * scale).astype(np.float32)

    def validate(self) -> None:
        n, k = self.codes.shape
        blocks = self.n_blocks
        if self.codes.dtype != np.uint8 or self.zero_points.dtype != np.uint8:
            raise ValueError("codes and zero_points must be uint8")
        if self.scales.shape != (n, blocks) or self.zero_points.shape != (n, blocks):
            raise ValueError(f"scales/zero_points must be [{n}, {blocks}], got {self.scales.shape}/{self.zero_points.shape}")
        top = (1 << self.bits) - 1
        if self.codes.size and int(self.codes.max()) > top or self.zero_points.size and int(self.zero_points.max()) > top:
            raise ValueError(f"codes/zero points exceed {self.bits} bits")


def concat_n(parts: list[BlockQuantized]) -> BlockQuantized:
    """Stack weights that share one input (q, k, v; gate, up) along N, as one packed MatMul."""
    first = parts[0]
    if any(p.block_size != first.block_size or p.bits != first.bits or p.codes.shape[1] != first.codes.shape[1] for p in parts):
        raise ValueError("parts to concatenate need the same K, block size and bits")
    return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                          np.concatenate([p.zero_points for p in parts]), first.block_size, first.bits)


def block_scale_zero(block_min: np.ndarray, block_max: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of blocks with the given ranges, the way onnxruntime's blockwise quantizer
    picks them: the range is widened to include 0 (so 0 is exact), scale = range / (2**bits - 1),
    zero point = round(-min / scale)."""
    top = float((1 << bits) - 1)
    lo = np.minimum(block_min, 0.0).astype(np.float32)
    hi = np.maximum(block_max, 0.0).astype(np.float32)
    scale = ((hi - lo) / np.float32(top)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    zero_fp = np.where(scale == 0, lo, np.float32(0) - lo / safe)
    zero = np.clip(_round_half_away(zero_fp), 0, top).astype(np.uint8)
    return scale, zero


def quantize_with(weight_NK: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """uint8 codes [N, K] of `weight_NK` under given per-block scales and zero points."""
    n, k = weight_NK.shape
    scale = np.repeat(scales.astype(np.float32), block_size, axis=1)[:, :k]
    zero = np.repeat(zero_points, block_size, axis=1)[:, :k].astype(np.float32)
    inverse = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, np.float32(1), scale))
    codes = _round_half_away(weight_NK.astype(np.float32) * inverse.astype(np.float32) + zero)
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)


def rtn_quantize(weight_NK: np.ndarray, block_size: int, bits: int = 4) -> BlockQuantized:
    """Round to nearest over each block's min/max range (onnxruntime's MatMulNBitsQuantizer, asymmetric)."""
    weight = np.asarray(weight_NK, dtype=np.float32)
    n, k = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight  # padding zeros are inside every widened range, so they change nothing
    view = padded.reshape(n, blocks, block_size)
    scales, zeros = block_scale_zero(view.min(axis=2), view.max(axis=2), bits)
    return BlockQuantized(quantize_with(weight, scales, zeros, block_size, bits), scales, zeros, block_size, bits)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), which onnxruntime's kernels use; numpy rounds halves to even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
