"""The top layer: the build pipeline, the CLI and benchmark orchestration."""
