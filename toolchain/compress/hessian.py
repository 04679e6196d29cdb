"""The layer-wise Hessian GPTQ minimises against: H = 2·XᵀX / n over the real (unpadded) input rows X
of one linear layer.

For a linear y = x Wᵀ, the squared output error of a weight change ΔW summed over the calibration
rows is ‖X ΔWᵀ‖² = Σ_rows ΔW_r (XᵀX) ΔW_rᵀ, a quadratic form in each output row's weights whose
Hessian is 2·XᵀX for every row alike. Dividing by the row count n only rescales it (GPTQ damps
relative to mean(diag H), and its updates use ratios of H⁻¹ entries), but keeps magnitudes
independent of how much text was used.

Padding rows are dropped before the product, so a padded batch adds exactly what its real rows add.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running Σ xᵀx (float64) and row count over batches of inputs [..., K] with an optional mask [...]."""

    def __init__(self, width: int, device=None):
        self.sum = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.add_product(*gram(x, mask))

    def add_product(self, product: torch.Tensor, rows: int) -> None:
        """Add a precomputed xᵀx of `rows` rows (several layers reading one input share it)."""
        self.sum += product
        self.count += rows

    def hessian(self) -> torch.Tensor:
        """2·XᵀX / n; all zeros if no row was seen."""
        return self.sum * (2.0 / max(self.count, 1))


def gram(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(xᵀx in float64, row count) over the rows of x [..., K] whose mask [...] is nonzero.

    The product of one batch is formed in float32 when x is (a BLAS float64 product costs twice the
    time on the widest inputs) and summed across batches in float64: within one batch a blocked
    float32 dot product of a few thousand terms keeps ~1e-6 relative error, far below the damping
    GPTQ adds, while float64 accumulation keeps that error from growing with the number of batches.
    """
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).to(torch.bool)]
    compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
    rows = rows.to(compute)
    return (rows.T @ rows).to(torch.float64), rows.shape[0]
