"""Compression methods on the canonical model: SliceGPT (rotation + slicing) and MoDeGPT."""

METHODS = ("slicegpt", "modegpt", "slicegpt+modegpt")
