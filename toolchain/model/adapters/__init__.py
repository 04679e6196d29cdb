"""HF architecture → canonical model. One small data-only file per architecture family."""

from toolchain.model.adapters import llama, opt, phi, phi3  # noqa: F401  (register adapters)
from toolchain.model.adapters.base import REGISTRY, Adapter, adapter_for, supported_architectures, to_canonical

__all__ = ["Adapter", "REGISTRY", "adapter_for", "supported_architectures", "to_canonical"]
