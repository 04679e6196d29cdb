"""Exporters: the canonical model to deployable formats (ONNX with KV cache, quantized ONNX,
TensorRT bundles, onnxruntime-genai and Triton packages)."""
