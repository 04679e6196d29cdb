"""SliceGPT: rotate each residual position onto the principal components of its calibration
activations, then keep the leading d_p components.

Calibration runs position by position through the already-sliced model: the residual entering
position p+1 is produced by blocks whose inputs were already rotated and sliced, so errors made
upstream are what later PCAs see. Only the calibration activations (kept in the model's dtype, or
as files with `offload`) and the current layer are touched at a time. Where a layer's weights come
from and go to is a `WeightStore`: the model itself here, or the checkpoint read and the output
written layer by layer (toolchain/compress/streaming.py); the same loop runs either way.

Beyond the paper, for small tied models:
- tie basis: with a sliced tied table, Q_0 serves both the embedding and the head, so it comes from
  the PCA of the first residual stream *and* the head input (γ ⊙ final normed residual), each
  trace-normalised (`tie_basis="joint"`); "first" is the plain PCA of the first stream.
- shared rotations (`share`): positions of one group use one basis, so the residual carries between
  them as is (no shortcut matrix). "layer": a sequential block's attention and MLP positions; the
  basis comes from the residual entering the layer (sliced upstream, as above) and the same residual
  after the dense attention, trace-normalised and summed. "all": one basis for every position, from
  the trace-normalised covariances of all positions measured once on the dense model.
- budgets (`target_params`): widths chosen so the total parameter count fits (see budget.py),
  uniformly or from the dense model's PCA spectra.

Modules: widths (what to slice to, checked before calibrating), statistics (covariances, bases,
the dense model's statistics), calibration (the residual flowing through the model), weights
(where the layers live), slicing (the position-by-position rotation and slicing).
"""

from toolchain.compress.slicegpt.slicing import slice_model

__all__ = ["slice_model"]
