"""Timing of the estimate's probes, and the resident size of this process.

A probe runs once to warm up (skipped when that one run is already long), then ``repeats``
times; the median wall time is kept, so a probe sees the machine as the run would (a shared
CPU's load included) without being thrown by one outlier.
"""
from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch


# A probe whose first run takes longer than this is not repeated.
LONG_PROBE_S = 2.0


def _rss_bytes() -> int:
    """Resident set size now (as :mod:`rocketlm.monitor` samples it)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = [time.perf_counter]


@contextmanager
def using_clock(name: str):
    """Time the probes with ``name``: ``wall`` (default) or ``cpu`` (this process's CPU seconds: with
    one thread, what a run takes on an idle machine, whatever the load while measuring)."""
    if name not in CLOCKS:
        raise ValueError(f"clock {name!r}: choose {', '.join(CLOCKS)}")
    previous, _clock[0] = _clock[0], CLOCKS[name]
    try:
        yield
    finally:
        _clock[0] = previous


def wall_clock() -> bool:
    """Whether the probes are timed in wall seconds (the default) rather than CPU seconds."""
    return _clock[0] is time.perf_counter


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds of one call of ``fn`` (device work included) on the current clock."""
    _sync(device)
    start = _clock[0]()
    fn()
    _sync(device)
    return _clock[0]() - start


def measure(fn: Callable[[], object], repeats: int = 3, device: torch.device | str | None = None,
            warmup: bool = True) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    first = timed(fn, device)
    if first > LONG_PROBE_S or (repeats <= 1 and not warmup):
        return first
    if repeats <= 1:
        return timed(fn, device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


@dataclass(frozen=True)
class GemmRate:
    dtype: str
    gflops: float  # achieved on this device: 2 n^3 / seconds of an n x n matrix product


def gemm_rate(dtype: str, device: torch.device | str = "cpu", n: int = 1024, repeats: int = 3) -> GemmRate:
    """Achieved GEMM rate of this device in ``dtype`` (for scaling GEMM-bound times to another device)."""
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    seconds = measure(lambda: a @ b, repeats, device)
    return GemmRate(dtype, 2.0 * n ** 3 / max(seconds, 1e-9) / 1e9)


def current_rss() -> int:
    """Resident bytes of this process now."""
    return _rss_bytes()


_BASELINE_SCRIPT = ("import torch, transformers, rocketlm.pipeline, rocketlm.checkpoint.io, os; "
                    "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")


@functools.lru_cache(maxsize=1)
def process_baseline() -> int:
    """Resident bytes of a fresh Python process with torch, transformers and rocketlm's pipeline imported
    (this process's own size when that cannot be measured)."""
    try:
        out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, timeout=300,
                             check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return current_rss()
