"""GPTQ on one weight matrix: quantize W [N, K] column by column onto MatMulNBits' block grid, each
column's rounding error compensated by the columns not yet quantized.

Why the update holds (Frantar et al., OBS applied column-wise). For one output row w the loss of a
change δ is δ H δᵀ / 2 with H = 2XᵀX. Fixing column q to its quantized value forces δ_q = ŵ_q − w_q;
the other free columns F minimising the loss then move by δ_F = −(w_q − ŵ_q)/[H_F⁻¹]_qq · [H_F⁻¹]_q,F,
where H_F⁻¹ is the inverse Hessian restricted to the still-free columns. Quantizing in the fixed order
0..K−1, the rows [H_F⁻¹]_q,F / sqrt([H_F⁻¹]_qq) for every step are exactly the rows of the upper
Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU; removing a variable from an inverse is one step of Gaussian
elimination, which is what Cholesky records). So with err = (w_q − ŵ_q) / U_qq, the update is
w_F −= err · U_q,F for all N rows at once.

Lazy batches: the update of far columns is linear in the errors, so the errors of a batch of columns
are applied to the columns after the batch in one matrix product; inside the batch each column's
error is applied immediately. Batches are whole multiples of `block_size`, so a quantization block
never straddles two batches and its grid can be read from fully updated weights.

Block grid: when the quantizer reaches a block's first column, that block's scale and zero point are
fixed from the *current* weights of the block (already moved by the errors of earlier columns), with
onnxruntime's min/max rule; each column is then rounded on that grid. The codes are therefore exactly
what MatMulNBits stores, and dequantizing them gives the weights GPTQ's error accounting assumed.
"""

from __future__ import annotations

import numpy as np
import torch

from toolchain.core.blockquant import BlockQuantized, block_scale_zero, quantize_with

LAZY_COLUMNS = 128  # columns per lazy batch (rounded to whole blocks)


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H with dead columns decoupled and damp·mean(diag H) added to the diagonal (float64).

    A dead input (diag 0: the column never sees a nonzero value) gets H_ii = 1 and no coupling, so
    its row of the Cholesky factor is diagonal: its own rounding error goes nowhere and no other
    column's error reaches it — the weight is rounded to nearest and kept (not zeroed, so inputs that
    calibration never excited still see the original weight). Damping keeps H positive definite and
    bounds the updates where calibration is nearly rank deficient.
    """
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (damped H)⁻¹; more damping is added if H is numerically indefinite."""
    for attempt in range(6):
        h = damped_hessian(hessian, damp * 10**attempt)
        factor, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ValueError("the Hessian stays indefinite even with heavy damping; check the calibration inputs")


def gptq_linear(weight: torch.Tensor, hessian: torch.Tensor, block_size: int = 32, bits: int = 4,
                damp: float = 0.01, upper: torch.Tensor | None = None) -> BlockQuantized:
    """GPTQ codes of `weight` [N, K] (nn.Linear layout) given its input Hessian [K, K]; `upper`, if
    given, is inverse_cholesky(hessian, damp) already computed (linears that read one input share it)."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    n, k = weight.shape
    w = weight.detach().to("cpu", torch.float32).clone()
    u = (inverse_cholesky(hessian.to("cpu"), damp) if upper is None else upper.to("cpu")).to(torch.float32)
    blocks = -(-k // block_size)
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)
    lazy = max(1, LAZY_COLUMNS // block_size) * block_size
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        # the column-by-column part runs in numpy: its many small rank-1 updates are single-threaded
        # there, where a threaded runtime would spend more time synchronising than computing
        chunk = w[:, start:stop].numpy().copy()
        errors = np.zeros_like(chunk)
        u_chunk = u[start:stop, start:stop].numpy()
        for j in range(stop - start):
            column = start + j
            if column % block_size == 0:
                block_index = column // block_size
                block = chunk[:, j:j + block_size]
                scales[:, block_index], zeros[:, block_index] = block_scale_zero(block.min(1), block.max(1), bits)
                scale, zero = scales[:, block_index, None], zeros[:, block_index, None]
            code = quantize_with(chunk[:, j, None], scale, zero, 1, bits)
            codes[:, column] = code[:, 0]
            dequantized = BlockQuantized(code, scale, zero, 1, bits).dequantize()[:, 0]
            err = (chunk[:, j] - dequantized) / u_chunk[j, j]
            chunk[:, j:] -= np.outer(err, u_chunk[j, j:])
            errors[:, j] = err
        w[:, stop:] -= torch.from_numpy(errors) @ u[start:stop, stop:]
    return BlockQuantized(codes, scales, zeros, block_size, bits)
