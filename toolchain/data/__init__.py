"""Where models and text come from: hub ids, local dirs and GGUF files; calibration/evaluation text."""
