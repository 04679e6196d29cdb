"""Exporters: the canonical model to deployable formats (ONNX with KV cache; TensorRT bundles)."""

from .onnx import ExportOptions, ExportResult, export_onnx, trace_onnx

__all__ = ["ExportOptions", "ExportResult", "export_onnx", "trace_onnx"]
