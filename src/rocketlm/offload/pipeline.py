"""The compression run of an offloaded model: the stages of :func:`rocketlm.pipeline.compress`, each
walking the decoder blocks in order with one block resident at a time.

Under torchrun every rank holds its own offloaded copy (one block resident per rank) and the stages split
as in memory: calibration and the fisher sensitivities data-parallel (sums all-reduced), profiling
layer-parallel, compression block-parallel (each rank writes its blocks' pieces into the shared cache;
rank 0 adopts every piece and writes the checkpoint), the knapsack on rank 0."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.costs import needs_sensitivity
from rocketlm.allocation.plan import allocate
from rocketlm.calibration.run import calibration_windows
from rocketlm.calibration.sensitivity import attach_sensitivities
from rocketlm.calibration.store import GramStore
from rocketlm.compression.apply import apply_allocation
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import RocketConfig
from rocketlm.distributed.assign import balance, factor_cost
from rocketlm.distributed.calibration import calibrate_parallel
from rocketlm.distributed.context import SINGLE, DistContext
from rocketlm.errors import ConfigError
from rocketlm.models.discovery import DecoderStructure, decoder_structure
from rocketlm.monitor import StageStats, stage
from rocketlm.offload.model import OffloadedModel
from rocketlm.profiling.run import run_profiling
from rocketlm.storage import stable_hash, write_json_atomic

log = logging.getLogger(__name__)


def check_offload_supported(config: RocketConfig) -> None:
    from rocketlm.compression.sequential import uses_refit_stage
    if uses_refit_stage(config):
        raise ConfigError("--offload disk does not yet support --sequential or --upstream-correction; "
                          "drop them or run in memory")


def check_shared_cache(cache: Path, dist: DistContext) -> None:
    """Several offloaded processes hand their compressed blocks to rank 0 as files in the cache: every rank
    must see rank 0's cache directory (one machine, or a shared file system)."""
    if not dist.distributed:
        return
    cache.mkdir(parents=True, exist_ok=True)
    blind = [r for r, (_, seen) in enumerate(dist.probe_shared(cache)) if not seen]
    if blind:
        raise ConfigError(f"--offload disk with several processes needs a cache directory every rank sees "
                          f"(ranks {blind} do not see {cache}): pass --cache-dir on a shared file system")


def calibrate_offloaded(off: OffloadedModel, structure: DecoderStructure, windows: torch.Tensor,
                        config: RocketConfig, store: GramStore, progress: bool, dist: DistContext = SINGLE) -> None:
    """:func:`rocketlm.distributed.calibration.calibrate_parallel` (one process or several), block ``b + 1``
    pinned once block ``b``'s Grams are handed out."""
    n = len(structure.blocks)

    def next_block(b: int) -> None:
        off.release(b)
        if b + 1 < n:
            off.pin(b + 1)

    # block 0 is read when it first runs (the keyword-capture forward and the first windows run every
    # block on demand, one at a time); from then on block b + 1 is pinned while block b's Grams are handed out
    with off.without_head():
        try:
            calibrate_parallel(off.model, structure, windows, config, store, progress, dist, after_block=next_block)
        finally:
            for b in list(off.pinned):
                off.release(b)


def profile_offloaded(off: OffloadedModel, structure, grams, store, config, dtype, progress,
                      dist: DistContext = SINGLE):
    """Profile the layers missing from ``store`` block by block, the block resident while its layers run;
    under torchrun each rank takes its share of the layers (as in memory) and holds only the blocks they are
    in. Every profile on rank 0, ``[]`` elsewhere."""
    from rocketlm.distributed.profiling import ShardStore, assign_layers, collect_shards

    todo = dist.on_main(lambda: [n for n in structure.all_targets if n not in store], "planning the profiling")
    share = set(assign_layers(off.model, todo, config, dist)) if dist.distributed else set(todo)
    target = ShardStore(store.dir, dist.rank) if dist.distributed else store
    mine = [(b, [n for n in names if n in share]) for b, names in enumerate(structure.targets)]
    mine = [(b, names) for b, names in mine if names]
    desc = "profiling (blocks)" + (f", {dist.tag}" if dist.distributed else "")
    with dist.step("profiling"), tqdm(total=len(mine), desc=desc, disable=not progress) as bar:
        for b, names in mine:
            with off.holding(b):
                run_profiling(off.model, structure, grams, target, config, dtype, False, None, layers=names,
                              workers=config.profile_workers or 1)  # auto: one layer's working set (memory first)
            bar.update(1)
    if dist.distributed:
        collect_shards(target, store, dist)
    return [store.layers[name] for name in structure.all_targets] if dist.is_main else []


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


def assign_blocks(structure, allocation, config: RocketConfig, dist: DistContext) -> list[int]:
    """This rank's blocks to compress, packed by their estimated factoring cost (every block on one process)."""
    n = len(structure.blocks)
    if not dist.distributed:
        return list(range(n))
    by_name = {c.name: c for c in allocation.choices}
    costs = {str(b): sum(factor_cost(c.d_in, c.d_out, c.k, c.s) * (1 + config.refine_iters)
                         for c in (by_name[name] for name in names if name in by_name) if not c.dense)
             for b, names in enumerate(structure.targets)}
    share = sorted(int(b) for b in balance(costs, dist.world_size)[dist.rank])
    log.info("compression: %s takes blocks %s", dist.tag, share)
    return share


def compress_blocks_offloaded(off: OffloadedModel, structure, allocation, grams, config, dtype, progress,
                              pieces_dir: Path, dist: DistContext = SINGLE) -> dict:
    """Factor block by block; each compressed block goes to its piece file under ``pieces_dir`` (with its
    checks beside it) and back to meta. Blocks whose piece an interrupted run already wrote are not
    factored again. Under torchrun each rank factors its share of the blocks, then rank 0 adopts the other
    ranks' pieces, so its model is the whole compressed model."""
    worst = {"profile_vs_shipped": 0.0, "profile_vs_direct": 0.0}
    pieces_dir.mkdir(parents=True, exist_ok=True)
    by_name = {c.name: c for c in allocation.choices}
    reused = 0

    def piece_paths(b: int) -> tuple[Path, Path]:
        return pieces_dir / f"block-{b:05d}.safetensors", pieces_dir / f"block-{b:05d}.json"

    def adopt(b: int) -> dict:
        piece, record = piece_paths(b)
        rebuild_compressed_on_meta(off.model, [by_name[n] for n in structure.targets[b] if n in by_name], dtype)
        off.adopt_piece(b, piece)
        return json.loads(record.read_text())

    def keep_worst(checks: dict) -> None:
        for key in worst:
            worst[key] = max(worst[key], checks[key])

    share = assign_blocks(structure, allocation, config, dist)
    desc = "compression (blocks)" + (f", {dist.tag}" if dist.distributed else "")
    with dist.step("compressing"):
        for b in tqdm(share, desc=desc, disable=not progress):
            piece, record = piece_paths(b)
            if piece.is_file() and record.is_file():
                checks = adopt(b)
                reused += 1
            else:
                off.pin(b)
                checks = apply_allocation(off.model, structure, allocation, grams, config, dtype, False, None,
                                          only=set(structure.targets[b]))
                off.store_block(b, piece)
                write_json_atomic(record, {key: checks[key] for key in worst})
            keep_worst(checks)
    if dist.distributed:
        with dist.step("adopting the other ranks' blocks"):
            if dist.is_main:
                for b in sorted(set(range(len(structure.blocks))) - set(share)):
                    keep_worst(adopt(b))
    if reused:
        log.info("compression: %d of %d blocks reused from %s (an interrupted run)", reused, len(share), pieces_dir)
    return worst


def compress_offloaded(model, tokenizer, config: RocketConfig, *, cache_dir=None, data_dir=None,
                       progress: bool = True, dist=None):
    from rocketlm.distributed.profiling import open_profile_store
    from rocketlm.distributed.sensitivity import sensitivities_parallel
    from rocketlm.pipeline import (CompressionResult, default_cache_dir, rank_record, run_keys,
                                   targets_fingerprint, value_dtype)

    check_offload_supported(config)
    dist = dist or SINGLE
    progress = progress and dist.is_main
    off: OffloadedModel = model.rocketlm_offload
    stats: dict[str, StageStats] = {}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    check_shared_cache(cache, dist)
    structure = decoder_structure(model, config.targets, config.ignore)
    dtype = value_dtype(model, config)
    with stage("calibration", stats):
        with dist.step("reading the calibration data"):
            windows, source = calibration_windows(tokenizer, config, data_dir)
            keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, dtype)
        meta = {"source": source, "samples": config.calib_samples, "seq_len": config.calib_seq_len,
                "seed": config.seed}
        grams = dist.on_main_first(lambda: GramStore(cache, keys.calibration, meta), "opening the Gram cache")
        calibrate_offloaded(off, structure, windows, config, grams, progress, dist)
    with stage("profiling", stats):
        store = open_profile_store(cache, keys.profile, {"calibration": keys.calibration, "grid": config.grid}, dist)
        profiles = profile_offloaded(off, structure, grams, store, config, dtype, progress, dist)
    with stage("allocation", stats):
        if needs_sensitivity(config.cost):  # block by block, one block resident, block inputs spilled to disk
            attach_sensitivities(profiles, sensitivities_parallel(
                off.model, structure, windows, config.sensitivity_samples, cache, keys.calibration, progress, dist,
                hold=off.holding, spill_dir=off.work_dir))
            off.remap()  # the head gradient read the whole (tied) head: drop its pages before compressing
        allocation = dist.on_main(lambda: allocate(profiles, config.removed_ratio, config.cost, config.budget_count,
                                                   config.alpha), "allocating")
    log.info("allocation: %s cost, removed %.2f%% (target %.2f%%)", config.cost,
             100 * allocation.achieved_removed_ratio, 100 * config.removed_ratio)
    with stage("compression", stats):
        pieces = cache / "compressed" / pieces_key(keys.profile, allocation, config, dtype)
        checks = compress_blocks_offloaded(off, structure, allocation, grams, config, dtype, progress, pieces, dist)
    checks = {**checks, "calibration_source": source, "profile_store": str(store.path), "offload": "disk"}
    if dist.distributed:
        checks["ranks"] = dist.all_gather(rank_record(dist, stats))
    return CompressionResult(model, tokenizer, config, allocation, profiles, stats, keys, checks)
