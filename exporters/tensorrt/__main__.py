"""python -m exporters.tensorrt {build,check,validate}: the build command every bundle prints."""

from exporters.tensorrt.cli import cli

cli(prog_name="python -m exporters.tensorrt")
