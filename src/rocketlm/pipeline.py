"""Orchestration of a compression run: calibration -> profiling -> allocation -> compression.

Each stage lives in its own package and takes the previous stage's result; the two expensive
stages are cached in hash-keyed stores under ``cache_dir`` so that an interrupted run resumes
where it stopped. This module only wires them together.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rocketlm.allocation.plan import Allocation, allocate
from rocketlm.calibration.run import calibration_windows, run_calibration
from rocketlm.calibration.store import GramStore
from rocketlm.allocation.costs import needs_sensitivity
from rocketlm.calibration.sensitivity import attach_sensitivities
from rocketlm.compression.apply import apply_allocation
from rocketlm.compression.sequential import compress_with_refits, decide_sequential, uses_refit_stage
from rocketlm.config import RocketConfig
from rocketlm.distributed.context import SINGLE, DistContext
from rocketlm.distributed.profiling import open_profile_store
from rocketlm.distributed.sensitivity import sensitivities_parallel
from rocketlm.models.discovery import DecoderStructure, decoder_structure
from rocketlm.monitor import StageStats, stage
from rocketlm.profiling.profile import LayerProfile, run_ks_search
from rocketlm.profiling.run import run_profiling
from rocketlm.storage import CACHE_ENV, default_cache_dir, model_fingerprint, stable_hash  # noqa: F401

log = logging.getLogger(__name__)

@dataclass
class RunKeys:
    model: str
    calibration: str
    profile: str


@dataclass
class CompressionResult:
    model: torch.nn.Module
    tokenizer: object
    config: RocketConfig
    allocation: Allocation
    profiles: list[LayerProfile]
    stats: dict[str, StageStats] = field(default_factory=dict)
    keys: RunKeys | None = None
    checks: dict = field(default_factory=dict)


def value_dtype(model: torch.nn.Module, config: RocketConfig) -> torch.dtype:
    return getattr(torch, config.save_dtype) if config.save_dtype else next(model.parameters()).dtype


def targets_fingerprint(model: torch.nn.Module, structure: DecoderStructure) -> str:
    """The model fingerprint the caches are keyed by: config and every targeted weight."""
    if getattr(model, "rocketlm_offload", None) is not None:  # read from disk one weight at a time
        return model.rocketlm_offload.fingerprint([f"{name}.weight" for name in structure.all_targets])
    return model_fingerprint(model, [f"{name}.weight" for name in structure.all_targets])


def run_keys(model_key: str, windows: torch.Tensor, structure: DecoderStructure, config: RocketConfig,
             dtype: torch.dtype) -> RunKeys:
    calib = stable_hash(model_key, windows, list(structure.all_targets))
    # a ks search keeps, per (layer, removed ratio), the candidates its descent visited for the cost it searched
    # (one store per searched cost: fisher shares output's); exhaustive profiles keep the key they always had
    mode, searched = run_ks_search(config)
    search = () if mode == "exhaustive" else (mode, "costs", *searched)
    profile = stable_hash(calib, config.grid.removed_ratios, config.grid.ks, config.whitening_eps,
                          config.ridge_rel, config.importance_power, config.profile_dtype, str(dtype), *search)
    return RunKeys(model_key, calib, profile)


def compress(model, tokenizer, config: RocketConfig, *, cache_dir: str | os.PathLike | None = None,
             data_dir: str | None = None, progress: bool = True, dist: DistContext | None = None) -> CompressionResult:
    """Compress ``model`` in place with ROCKET under ``config`` and return the result.

    ``dist`` (default: one process): the :class:`DistContext` of a multi-process run
    (:func:`rocketlm.distributed.init_from_env`); every rank calls this with the same arguments.
    Calibration and the fisher cost's sensitivities are data-parallel, profiling and compression
    layer-parallel, the knapsack on rank 0.
    Rank 0's result is complete (model, profiles); the other ranks' results hold the allocation
    and only their own share of the compressed layers, and no profiles.
    """
    offloaded = getattr(model, "rocketlm_offload", None) is not None
    config = decide_sequential(config, (dist or SINGLE).world_size, offloaded)  # what auto means for this run
    if offloaded:  # --offload disk: one block resident at a time
        from rocketlm.offload.pipeline import compress_offloaded
        return compress_offloaded(model, tokenizer, config, cache_dir=cache_dir, data_dir=data_dir,
                                  progress=progress, dist=dist)
    dist = dist or SINGLE
    progress = progress and dist.is_main
    stats: dict[str, StageStats] = {}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    structure = decoder_structure(model, config.targets, config.ignore)
    dtype = value_dtype(model, config)
    with stage("calibration", stats):
        with dist.step("reading the calibration data"):
            windows, source = calibration_windows(tokenizer, config, data_dir)
            keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, dtype)
        meta = {"source": source, "samples": config.calib_samples, "seq_len": config.calib_seq_len,
                "seed": config.seed}
        grams = dist.on_main_first(lambda: GramStore(cache, keys.calibration, meta), "opening the Gram cache")
        run_calibration(model, structure, windows, config, grams, progress, dist)
    with stage("profiling", stats):
        store = open_profile_store(cache, keys.profile, {"calibration": keys.calibration, "grid": config.grid}, dist)
        profiles = run_profiling(model, structure, grams, store, config, dtype, progress, dist)
    with stage("allocation", stats):
        if needs_sensitivity(config.cost):  # per-layer sensitivities for the "fisher" cost (one backward pass, cached)
            sensitivities = sensitivities_parallel(model, structure, windows, config.sensitivity_samples, cache,
                                                   keys.calibration, progress, dist)
            attach_sensitivities(profiles, sensitivities)
        allocation = dist.on_main(lambda: allocate(profiles, config.removed_ratio, config.cost, config.budget_count,
                                                   config.alpha), "allocating")
    log.info("allocation: %s cost, removed %.2f%% (target %.2f%%)", config.cost,
             100 * allocation.achieved_removed_ratio, 100 * config.removed_ratio)
    with stage("compression", stats):
        if uses_refit_stage(config):  # sequential calibration / upstream correction / refinement (one process)
            checks = compress_with_refits(model, structure, allocation, grams, windows, config, dtype, progress, dist)
        else:
            checks = apply_allocation(model, structure, allocation, grams, config, dtype, progress, dist)
    checks = {**checks, "calibration_source": source, "profile_store": str(store.path)}
    if dist.distributed:
        checks["ranks"] = dist.all_gather(rank_record(dist, stats))
    return CompressionResult(model, tokenizer, config, allocation, profiles, stats, keys, checks)


def rank_record(dist: DistContext, stats: dict[str, StageStats]) -> dict:
    """One rank's host and stage figures, for the manifest of a multi-process run."""
    return {"rank": dist.rank, "host": dist.host, "backend": dist.backend,
            "stages": {name: s.to_json() for name, s in stats.items()}}
