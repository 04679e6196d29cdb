"""Compression methods on the canonical model: SliceGPT (rotation + slicing) and MoDeGPT; `none` converts
to the canonical model only (e.g. to rotate or quantize the dense model)."""

METHODS = ("slicegpt", "modegpt", "slicegpt+modegpt", "none")  # none: convert only
