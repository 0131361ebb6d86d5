"""Allocation and storage kernels: the knapsack on synthetic profiles of the right size, and the
Gram cache's write and read rates.

The allocation is timed by running :func:`rocketlm.allocation.plan.allocate` itself (the alpha
search included) on profiles with the real layers' shapes and valid candidates and synthetic
errors: per layer, ``a * removed^p`` (``a`` log-normal, ``p`` in 0.8..2) with a convex ks effect
and a little noise, the shape of measured profiles. Its run time depends on those errors only
through how many options survive the solver's bounds, so the figure is an order of magnitude
check rather than a prediction to the percent.
"""
from __future__ import annotations

import logging
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rocketlm.allocation.plan import InfeasibleAllocationError, allocate
from rocketlm.calibration.grams import BlockGrams
from rocketlm.calibration.store import GramStore
from rocketlm.config import GridConfig
from rocketlm.estimation.describe import ModelDescription
from rocketlm.estimation.timing import measure, timed
from rocketlm.factorization.sparse_dictionary import kept_bytes, kept_values
from rocketlm.profiling.profile import Candidate, LayerProfile, valid_shapes

log = logging.getLogger(__name__)


def synthetic_profiles(description: ModelDescription, grid: GridConfig, value_bytes: int,
                       seed: int = 0) -> list[LayerProfile]:
    """One :class:`LayerProfile` per target layer with every valid candidate and plausible errors."""
    rng = np.random.default_rng(seed)
    shapes = {shape: valid_shapes(*shape, grid) for shape in description.shapes()}
    profiles = []
    for layer in description.layers:
        dense = layer.d_in * layer.d_out
        scale, power = float(rng.lognormal(-0.5, 0.6)), float(rng.uniform(0.8, 2.0))
        candidates = []
        for removed, ks, k, s in shapes[(layer.d_in, layer.d_out)]:
            values = kept_values(layer.d_in, layer.d_out, k, s)
            error = scale * (1.0 - values / dense) ** power * (1.0 + 0.05 * (ks - 1.8) ** 2)
            error *= float(rng.lognormal(0.0, 0.02))
            on_disk = kept_bytes(layer.d_in, layer.d_out, k, s, value_bytes)
            candidates.append(Candidate(removed, ks, k, s, values, on_disk, min(error, 1.0),
                                        min(error * float(rng.lognormal(0.0, 0.3)), 1.0)))
        profile = LayerProfile(layer.name, layer.d_in, layer.d_out, dense, dense * value_bytes, layer.group,
                               candidates)
        profile.sensitivity = float(rng.lognormal(0.0, 1.0))  # what the "fisher" cost reads
        profiles.append(profile)
    return profiles


@dataclass(frozen=True)
class AllocationProbe:
    seconds: float  # one allocate() call
    profile_bytes: int  # Python memory of the profiles the allocation reads
    candidates: int
    feasible: bool
    compressed: frozenset[str] = frozenset()  # layers the synthetic allocation compresses (all if infeasible)


def probe_allocation(description: ModelDescription, grid: GridConfig, removed_ratio: float, cost: str,
                     budget_count: str, alpha, value_bytes: int, repeats: int = 3) -> AllocationProbe:
    """Time :func:`allocate` on synthetic profiles of ``description``'s layers."""
    tracemalloc.start()
    try:
        profiles = synthetic_profiles(description, grid, value_bytes)
        profile_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    feasible, compressed = True, frozenset(p.name for p in profiles)

    def solve():
        nonlocal feasible, compressed
        try:
            result = allocate(profiles, removed_ratio, cost, budget_count, alpha)
            compressed = frozenset(c.name for c in result.choices if not c.dense)
        except InfeasibleAllocationError:
            feasible = False

    seconds = measure(solve, repeats)
    if not feasible:
        log.warning("allocation probe: %.0f%% removed is not reachable with this grid on synthetic errors; "
                    "timed up to the infeasibility proof", 100 * removed_ratio)
    count = sum(len(p.candidates) for p in profiles)
    log.info("allocation probe: %d layers, %d candidates, %.3f s, %d layers compressed", len(profiles), count,
             seconds, len(compressed))
    return AllocationProbe(seconds, profile_bytes, count, feasible, compressed)


@dataclass(frozen=True)
class DiskProbe:
    write_bytes_per_s: float  # GramStore.put
    read_bytes_per_s: float  # GramStore.get (possibly from the page cache)


def probe_disk(directory: str | Path | None, size_bytes: int) -> DiskProbe:
    """Write and read back one block of ``size_bytes`` (at most 64 MiB) through :class:`GramStore`,
    in a temporary directory under ``directory`` (the cache directory's file system)."""
    n = max(64, int((min(size_bytes, 64 << 20) / 8) ** 0.5))
    grams = BlockGrams({"g": torch.zeros(n, n, dtype=torch.float64)}, {"g": "g"}, 1)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="rocketlm-estimate-") as tmp:
        store = GramStore(Path(tmp), "probe", {})
        write_s = timed(lambda: store.put(0, grams))
        read_s = timed(lambda: store.get(0))
    size = 8 * n * n
    return DiskProbe(size / max(write_s, 1e-9), size / max(read_s, 1e-9))
