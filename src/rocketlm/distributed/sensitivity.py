"""Data-parallel sensitivities (the ``fisher`` cost): each rank runs the forward and backward pass over
its share of the sensitivity windows; the per-layer sums of ``||g_t||^2``, ``||y_t||^2`` and the token
count are summed over the ranks (``all_reduce`` in float64) and rank 0 writes the cache.

Each window's contribution is computed as a single process computes it (batches of one window), so the
result equals the single-process one up to the order of the float64 summation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rocketlm.calibration.sensitivity import (LayerSensitivity, SensitivitySums, measure_sensitivity_sums,
                                              read_sensitivity_cache, sensitivity_cache_path,
                                              write_sensitivity_cache)
from rocketlm.distributed.context import DistContext
from rocketlm.models.discovery import DecoderStructure

log = logging.getLogger(__name__)


def window_share(n_windows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Window range ``[start, stop)`` of ``rank``: contiguous, sizes differing by at most one; a rank gets
    none when there are more ranks than windows."""
    return rank * n_windows // world_size, (rank + 1) * n_windows // world_size


def reduce_sums(sums: SensitivitySums, device: torch.device, dist: DistContext) -> SensitivitySums:
    """``sums`` added over every rank (every rank gets the total)."""
    names = sorted(sums.grad_sq)
    packed = torch.tensor([sums.grad_sq[n] for n in names] + [sums.out_sq[n] for n in names] + [float(sums.tokens)],
                          dtype=torch.float64, device=device)
    dist.all_reduce_sum_([packed])
    values = packed.tolist()
    k = len(names)
    return SensitivitySums(dict(zip(names, values[:k])), dict(zip(names, values[k: 2 * k])), dict(sums.d_out),
                           int(round(values[-1])))


def sensitivities_parallel(model, structure: DecoderStructure, windows: torch.Tensor, samples: int,
                           cache_dir: Path, calibration_key: str, progress: bool,
                           dist: DistContext, hold=None, spill_dir: Path | None = None) -> dict[str, LayerSensitivity]:
    """:func:`rocketlm.calibration.sensitivity.cached_sensitivities` over every rank: rank 0's cache if it has
    one, otherwise each rank measures its share of the first ``samples`` windows and the sums are reduced.
    ``hold`` and ``spill_dir``: as :func:`rocketlm.calibration.sensitivity.measure_sensitivity_sums` (an offloaded
    model's block holder and work directory)."""
    path = sensitivity_cache_path(cache_dir, calibration_key, samples)
    cached = dist.on_main(lambda: read_sensitivity_cache(path), "reading the sensitivity cache")
    if cached is not None:
        log.info("sensitivities: cached in %s", path)
        return cached
    windows = windows[:samples]
    start, stop = window_share(windows.shape[0], dist.rank, dist.world_size)
    log.info("sensitivities: %s measures windows %d..%d of %d", dist.tag, start, stop - 1, windows.shape[0])
    sums = None
    with dist.step("measuring the layer sensitivities"):
        sums = measure_sensitivity_sums(model, structure, windows[start:stop], progress=progress, hold=hold,
                                        spill_dir=spill_dir)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    result = reduce_sums(sums, device, dist).finish()
    dist.on_main(lambda: write_sensitivity_cache(path, calibration_key, samples, result),
                 "writing the sensitivity cache", broadcast=False)
    return result
