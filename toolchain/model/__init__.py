"""The canonical decoder, the adapters that map HF checkpoints onto it, and its sizes.

`toolchain.model.sizes` is plain arithmetic and loads no torch, so this package imports its
submodules only when asked: `from toolchain.model import SlicedForCausalLM` (or importing
`toolchain.model.modeling`) loads the decoder and registers it with transformers' Auto classes."""

__all__ = ["SlicedConfig", "SlicedForCausalLM"]


def __getattr__(name: str):
    if name in __all__:
        from toolchain.model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'toolchain.model' has no attribute {name!r}")
