"""Compress LLMs (SliceGPT, MoDeGPT) into dense smaller HF-style models and ship them to ONNX/TensorRT.

The package is layered; imports point down only (checked by the import contract in pyproject.toml):
core (no torch) → model → data → compress → runtime → exporters → analysis → app. Importing
`toolchain` itself loads nothing heavy; `import toolchain.model.modeling` registers the canonical model with
transformers' Auto classes, so a saved model loads with `AutoModelForCausalLM.from_pretrained(dir)`
without trust_remote_code.
"""

__version__ = "0.1.0"
