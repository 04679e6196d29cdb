"""Roofline planner: from a model config alone (no weights), will the dense and the compressed model
fit on a GPU, and how fast can they be at best?

  gpus       the GPU table and picking rows by name
  configs    built-in public configs, local config.json files, the Hugging Face cache
  estimate   variants (sizes from toolchain/model/sizes), memory fit, time bounds, `plan`
  calibrate  efficiency factors fitted from measured times
  render     summary line, tables, Markdown
"""

from toolchain.analysis.roofline.calibrate import fit_efficiency
from toolchain.analysis.roofline.configs import KNOWN_CONFIGS, ModelShape, known_config, model_shape, resolve_config
from toolchain.analysis.roofline.estimate import (
    ASSUMPTIONS,
    DTYPES,
    OVERHEAD_BYTES,
    ROUND_TO,
    SCHEMA,
    USABLE_FRACTION,
    WEIGHT_BYTES,
    Efficiency,
    Estimate,
    Layout,
    Plan,
    Variant,
    bound_seconds,
    check_slice,
    count_params,
    dense_layout,
    estimate,
    gpus_needed,
    kv_cache_bytes,
    make_variant,
    normalise_dtype,
    phase_bytes,
    phase_flops,
    plan,
    slice_width,
    sliced_layout,
    weight_read_bytes,
    workspace_bytes,
)
from toolchain.analysis.roofline.gpus import GPU_SPECS, GPUS, GiB, GPUSpec, get_gpu, select_gpus
from toolchain.analysis.roofline.render import (
    TABLE_HEADER,
    compressed_label,
    fmt_params,
    render_markdown,
    summary_line,
    table_rows,
)

__all__ = [
    "ASSUMPTIONS", "DTYPES", "GPUS", "GPU_SPECS", "KNOWN_CONFIGS", "OVERHEAD_BYTES", "ROUND_TO", "SCHEMA",
    "TABLE_HEADER", "USABLE_FRACTION", "WEIGHT_BYTES", "Efficiency", "Estimate", "GPUSpec", "GiB", "Layout",
    "ModelShape", "Plan", "Variant", "bound_seconds", "check_slice", "compressed_label", "count_params",
    "dense_layout", "estimate", "fit_efficiency", "fmt_params", "get_gpu", "gpus_needed", "known_config",
    "kv_cache_bytes", "make_variant", "model_shape", "normalise_dtype", "phase_bytes", "phase_flops", "plan",
    "render_markdown", "resolve_config", "select_gpus", "slice_width", "sliced_layout", "summary_line",
    "table_rows", "weight_read_bytes", "workspace_bytes",
]
