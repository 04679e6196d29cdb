"""Compress LLMs (SliceGPT, MoDeGPT) into dense smaller HF-style models and ship them to ONNX/TensorRT.

Importing the package registers the canonical model with transformers' Auto classes, so a saved
model loads with `AutoModelForCausalLM.from_pretrained(dir)` without trust_remote_code.
"""

__version__ = "0.1.0"

from .model import SlicedConfig, SlicedForCausalLM  # noqa: E402,F401  (registers Auto classes)
