"""What this machine offers for building and running TensorRT engines. Engines only run on the GPU
architecture and TensorRT version that built them, so both the builder and the session ask here first.
`tensorrt` and `torch` are imported inside the probe: importing this module costs nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolchain.core.errors import first_line


@dataclass
class TrtEnvironment:
    """What this machine offers for building/running engines; `reason` is None when it can."""

    tensorrt: str | None = None
    cuda: str | None = None
    gpu: str | None = None
    capability: str | None = None
    reason: str | None = None

    @property
    def key(self) -> str:
        """Timing caches and engines are only valid for this combination."""
        raw = f"{self.gpu}-sm{(self.capability or '').replace('.', '')}-trt{self.tensorrt}-cuda{self.cuda}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)

    def describe(self) -> dict:
        return {"gpu": self.gpu, "compute_capability": self.capability, "tensorrt": self.tensorrt, "cuda": self.cuda}


def probe_environment() -> TrtEnvironment:
    env, reasons = TrtEnvironment(), []
    try:
        import tensorrt as trt

        env.tensorrt = trt.__version__
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install raising OSError)
        reasons.append(f"tensorrt is not importable ({first_line(err, 200)})")
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env.gpu, env.capability, env.cuda = torch.cuda.get_device_name(), f"{major}.{minor}", torch.version.cuda
        else:
            reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    except Exception as err:  # noqa: BLE001
        reasons.append(f"CUDA could not be queried ({first_line(err, 200)})")
    env.reason = " and ".join(reasons) or None
    return env


def trt_available() -> bool:
    """True where an engine can be built and run here: tensorrt imports and a CUDA GPU is visible."""
    return probe_environment().reason is None
