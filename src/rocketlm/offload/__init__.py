"""Models larger than memory: sequential onloading (``--offload disk``).

The model is built on the meta device; its weights stay in the safetensors file (memory-mapped)
and one decoder block at a time is materialised on the compute device for calibration, profiling
and compression, then released. The compressed checkpoint is written block by block.
"""
from __future__ import annotations

from rocketlm.config import OFFLOAD_MODES  # noqa: E402,F401


def __getattr__(name):
    if name in ("OffloadedModel", "is_offloaded", "load_offloaded"):
        from rocketlm.offload import model
        return getattr(model, name)
    raise AttributeError(name)
