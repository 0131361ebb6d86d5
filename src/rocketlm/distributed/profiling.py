"""Layer-parallel profiling into the one resumable profile store.

Layout: ``profiles/<key>/layers.jsonl`` is the store a single process appends to; in a
multi-process run rank ``r`` appends only to its own shard ``layers.rank<r>.jsonl`` (one JSON
line per layer, fsynced, as the single-process store), so no file has two writers. When the
ranks are done, rank 0 gathers every shard's profiles, appends them to ``layers.jsonl`` and the
shards are removed. Whoever opens the store next (rank 0 or a single process) first merges the
shards an interrupted run left behind, so both kinds of run resume from each other's work.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.distributed.assign import balance, profile_cost
from rocketlm.distributed.context import SINGLE, DistContext
from rocketlm.models.discovery import DecoderStructure
from rocketlm.profiling.profile import LayerProfile
from rocketlm.profiling.store import ProfileStore

log = logging.getLogger(__name__)

SHARD_GLOB = "layers.rank*.jsonl"


class ShardStore(ProfileStore):
    """One rank's append-only shard of a :class:`ProfileStore` directory (same line format and
    torn-line recovery; no metadata of its own)."""

    def __init__(self, directory: str | Path, rank: int | None = None, path: Path | None = None):
        self.dir = Path(directory)
        self.path = path if path is not None else self.dir / f"layers.rank{rank}.jsonl"
        self.layers: dict[str, LayerProfile] = {}
        self._load()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def merge_shards(store: ProfileStore) -> int:
    """Append to ``store`` the profiles left in shards by an interrupted multi-process run, then
    remove the shards; returns how many profiles were recovered."""
    recovered = 0
    for path in sorted(store.dir.glob(SHARD_GLOB)):
        shard = ShardStore(store.dir, path=path)
        for profile in shard.layers.values():
            if profile.name not in store:
                store.put(profile)
                recovered += 1
        shard.remove()
    if recovered:
        log.info("profile store %s: recovered %d layers from an interrupted multi-process run", store.dir, recovered)
    return recovered


def open_profile_store(root: str | Path, key: str, meta: dict, dist: DistContext = SINGLE) -> ProfileStore:
    """The profile store of ``key``, opened by rank 0 first (it creates the files and merges
    leftover shards), then by the other ranks."""
    def open_store() -> ProfileStore:
        store = ProfileStore(Path(root), key, meta)
        if dist.is_main:
            merge_shards(store)
        return store
    return dist.on_main_first(open_store, "opening the profile store")


def layer_shapes(model, names) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in names}


def assign_layers(model, names: list[str], config: RocketConfig, dist: DistContext) -> list[str]:
    """This rank's share of ``names``, packed by estimated profiling cost."""
    shapes = layer_shapes(model, names)
    costs = {name: profile_cost(*shapes[name], config.grid) for name in names}
    shares = balance(costs, dist.world_size)
    total = sum(costs.values()) or 1.0
    log.info("profiling: %s takes %d of the %d layers to profile (%.1f%% of the estimated work)", dist.tag,
             len(shares[dist.rank]), len(names), 100 * sum(costs[n] for n in shares[dist.rank]) / total)
    return shares[dist.rank]


def profile_parallel(model, structure: DecoderStructure, grams_store: GramStore, store: ProfileStore,
                     config: RocketConfig, value_dtype: torch.dtype, progress: bool,
                     dist: DistContext) -> list[LayerProfile]:
    """Profile the layers missing from ``store`` over the ranks; every profile on rank 0, ``[]`` elsewhere."""
    from rocketlm.profiling.run import run_profiling

    todo = dist.on_main(lambda: [n for n in structure.all_targets if n not in store], "planning the profiling")
    share = assign_layers(model, todo, config, dist)
    with dist.step("profiling"):
        shard = ShardStore(store.dir, dist.rank)
        run_profiling(model, structure, grams_store, shard, config, value_dtype, progress, layers=share,
                      desc=f"profiling (layers), {dist.tag}")
    collect_shards(shard, store, dist)
    return [store.layers[name] for name in structure.all_targets] if dist.is_main else []


def collect_shards(shard: ShardStore, store: ProfileStore, dist: DistContext) -> None:
    """Every rank's ``shard`` gathered into rank 0's ``store``; the shards are then removed."""
    gathered = dist.gather_to_main(list(shard.layers.values()))
    with dist.step("saving the profiles"):
        if dist.is_main:
            for profile in (p for part in gathered for p in part):
                if profile.name not in store:
                    store.put(profile)
    shard.remove()
