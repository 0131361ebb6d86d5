"""The compression run of an offloaded model: the stages of :func:`rocketlm.pipeline.compress`, each
walking the decoder blocks in order with one block resident at a time."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.costs import needs_sensitivity
from rocketlm.allocation.plan import allocate
from rocketlm.calibration.grams import iterate_block_grams
from rocketlm.calibration.run import calibration_windows
from rocketlm.calibration.sensitivity import attach_sensitivities, cached_sensitivities
from rocketlm.calibration.store import GramStore
from rocketlm.compression.apply import apply_allocation
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import RocketConfig
from rocketlm.errors import ConfigError
from rocketlm.models.discovery import DecoderStructure, decoder_structure
from rocketlm.monitor import StageStats, stage
from rocketlm.offload.model import OffloadedModel
from rocketlm.profiling.run import run_profiling
from rocketlm.storage import stable_hash, write_json_atomic

log = logging.getLogger(__name__)


def check_offload_supported(config: RocketConfig, dist=None) -> None:
    from rocketlm.compression.sequential import uses_refit_stage
    if dist is not None and dist.distributed:
        raise ConfigError("--offload disk runs in one process; drop torchrun or the offload")
    if uses_refit_stage(config):
        raise ConfigError("--offload disk does not yet support --sequential or --upstream-correction; "
                          "drop them or run in memory")


def calibrate_offloaded(off: OffloadedModel, structure: DecoderStructure, windows: torch.Tensor,
                        config: RocketConfig, store: GramStore, progress: bool) -> None:
    """:func:`rocketlm.calibration.run.run_calibration`, block ``b`` pinned while its windows run."""
    n = len(structure.blocks)
    missing = {b for b in range(n) if not store.has(b)}
    if not missing:
        return
    skip = set(range(n)) - missing
    with off.without_head(), tqdm(total=max(missing) + 1, desc="calibration (blocks)", disable=not progress) as bar:
        # block 0 is read when it first runs (the keyword-capture forward and the first windows run every
        # block on demand, one at a time); from then on block b + 1 is pinned while block b's Grams are handed out
        try:
            for b, grams in iterate_block_grams(off.model, structure, windows, config.calib_batch_size, skip, bar):
                if grams is not None:
                    store.put(b, grams)
                del grams
                off.release(b)
                if b + 1 < n:
                    off.pin(b + 1)
        finally:
            for b in list(off.pinned):
                off.release(b)


def profile_offloaded(off: OffloadedModel, structure, grams, store, config, dtype, progress):
    profiles = []
    todo = [b for b, names in enumerate(structure.targets) if any(name not in store for name in names)]
    with tqdm(total=len(structure.blocks), initial=len(structure.blocks) - len(todo), desc="profiling (blocks)",
              disable=not progress) as bar:
        for b, names in enumerate(structure.targets):
            if not names:
                continue
            if b in todo:
                with off.holding(b):
                    profiles += run_profiling(off.model, structure, grams, store, config, dtype, False, None,
                                              layers=names)
                bar.update(1)
            else:
                profiles += [store.layers[name] for name in names]
    return profiles


def pieces_key(profile_key: str, allocation, config: RocketConfig, dtype: torch.dtype) -> str:
    """What a compressed block depends on: the profiles (model, calibration, grid), the allocation and the
    compression settings."""
    choices = [(c.name, c.dense, c.k, c.s) for c in allocation.choices]
    return stable_hash(profile_key, choices, config.refine_iters, config.ridge_rel, config.importance_power,
                       config.whitening_eps, str(dtype))


def rebuild_compressed_on_meta(model, choices, dtype: torch.dtype) -> None:
    """Replace each compressed layer of ``choices`` by an empty :class:`SparseDictionaryLinear` of its
    shape on the meta device (the structure a stored piece of the block has)."""
    for choice in choices:
        if choice.dense:
            continue
        linear = model.get_submodule(choice.name)
        replace_module(model, choice.name, SparseDictionaryLinear(
            choice.d_in, choice.d_out, choice.k, choice.s, bias=getattr(linear, "bias", None) is not None,
            dtype=dtype, device="meta"))


def compress_blocks_offloaded(off: OffloadedModel, structure, allocation, grams, config, dtype, progress,
                              pieces_dir: Path) -> dict:
    """Factor block by block; each compressed block goes to its piece file under ``pieces_dir`` (with its
    checks beside it) and back to meta. Blocks whose piece an interrupted run already wrote are not
    factored again."""
    worst = {"profile_vs_shipped": 0.0, "profile_vs_direct": 0.0}
    pieces_dir.mkdir(parents=True, exist_ok=True)
    by_name = {c.name: c for c in allocation.choices}
    reused = 0
    for b in tqdm(range(len(structure.blocks)), desc="compression (blocks)", disable=not progress):
        piece, record = pieces_dir / f"block-{b:05d}.safetensors", pieces_dir / f"block-{b:05d}.json"
        if piece.is_file() and record.is_file():
            rebuild_compressed_on_meta(off.model, [by_name[n] for n in structure.targets[b] if n in by_name], dtype)
            off.adopt_piece(b, piece)
            checks = json.loads(record.read_text())
            reused += 1
        else:
            off.pin(b)
            checks = apply_allocation(off.model, structure, allocation, grams, config, dtype, False, None,
                                      only=set(structure.targets[b]))
            off.store_block(b, piece)
            write_json_atomic(record, {key: checks[key] for key in worst})
        for key in worst:
            worst[key] = max(worst[key], checks[key])
    if reused:
        log.info("compression: %d of %d blocks reused from %s (an interrupted run)", reused, len(structure.blocks),
                 pieces_dir)
    return worst


def compress_offloaded(model, tokenizer, config: RocketConfig, *, cache_dir=None, data_dir=None,
                       progress: bool = True, dist=None):
    from rocketlm.distributed.profiling import open_profile_store
    from rocketlm.pipeline import (CompressionResult, default_cache_dir, run_keys, targets_fingerprint,
                                   value_dtype)

    check_offload_supported(config, dist)
    off: OffloadedModel = model.rocketlm_offload
    stats: dict[str, StageStats] = {}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    structure = decoder_structure(model, config.targets, config.ignore)
    dtype = value_dtype(model, config)
    with stage("calibration", stats):
        windows, source = calibration_windows(tokenizer, config, data_dir)
        keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, dtype)
        meta = {"source": source, "samples": config.calib_samples, "seq_len": config.calib_seq_len,
                "seed": config.seed}
        grams = GramStore(cache, keys.calibration, meta)
        calibrate_offloaded(off, structure, windows, config, grams, progress)
    with stage("profiling", stats):
        store = open_profile_store(cache, keys.profile, {"calibration": keys.calibration, "grid": config.grid})
        profiles = profile_offloaded(off, structure, grams, store, config, dtype, progress)
    with stage("allocation", stats):
        if needs_sensitivity(config.cost):  # block by block, one block resident, block inputs spilled to disk
            attach_sensitivities(profiles, cached_sensitivities(
                off.model, structure, windows, config.sensitivity_samples, cache, keys.calibration, progress,
                hold=off.holding, spill_dir=off.work_dir))
            off.remap()  # the head gradient read the whole (tied) head: drop its pages before compressing
        allocation = allocate(profiles, config.removed_ratio, config.cost, config.budget_count, config.alpha)
    log.info("allocation: %s cost, removed %.2f%% (target %.2f%%)", config.cost,
             100 * allocation.achieved_removed_ratio, 100 * config.removed_ratio)
    with stage("compression", stats):
        pieces = cache / "compressed" / pieces_key(keys.profile, allocation, config, dtype)
        checks = compress_blocks_offloaded(off, structure, allocation, grams, config, dtype, progress, pieces)
    checks = {**checks, "calibration_source": source, "profile_store": str(store.path), "offload": "disk"}
    return CompressionResult(model, tokenizer, config, allocation, profiles, stats, keys, checks)
