"""The bottom layer: errors, file I/O, reports, build layout and the ONNX I/O spec. No torch here."""
