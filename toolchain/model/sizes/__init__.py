"""The one size model: parameters, weight bytes, KV-cache bytes and FLOPs from a model's shapes.

`describe(config)` reads a dense HF config or a canonical `SlicedConfig`; `planned(dense, plan)`
predicts the canonical model `toolchain slice` writes; `parameters(decoder)` counts it.
"""

from toolchain.model.sizes.counts import (
    GROUPS,
    WEIGHT_BYTES,
    ParameterReport,
    Parameters,
    Tensor,
    activation_bytes,
    attention_macs,
    block_parameters,
    count_parameters,
    flops_per_token,
    kv_cache_bytes,
    kv_elements_per_token,
    normalise_dtype,
    parameters,
    size_terms,
    tensors,
    weight_bytes,
)
from toolchain.model.sizes.decoder import Decoder, canonical, describe
from toolchain.model.sizes.planned import (
    METHODS,
    SHARE_MODES,
    TIE_MODES,
    CompressionPlan,
    check_slice,
    kept_dim,
    modegpt_dims,
    planned,
    position_groups,
    shortcuts_of,
    slice_width,
    sliced,
    uniform_widths,
)

__all__ = [
    "GROUPS", "METHODS", "SHARE_MODES", "TIE_MODES", "WEIGHT_BYTES", "CompressionPlan", "Decoder", "ParameterReport",
    "Parameters", "Tensor", "activation_bytes", "attention_macs", "block_parameters", "canonical", "check_slice",
    "count_parameters", "describe", "flops_per_token", "kept_dim", "kv_cache_bytes", "kv_elements_per_token",
    "modegpt_dims", "normalise_dtype", "parameters", "planned", "position_groups", "shortcuts_of", "size_terms",
    "slice_width", "sliced", "tensors", "uniform_widths", "weight_bytes",
]
