"""The canonical decoder, the adapters that map HF checkpoints onto it, and its sizes.

Importing this package registers the canonical model with transformers' Auto classes."""

from toolchain.model.modeling import SlicedConfig, SlicedForCausalLM

__all__ = ["SlicedConfig", "SlicedForCausalLM"]
