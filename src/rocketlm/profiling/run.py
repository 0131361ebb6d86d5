"""The profiling stage: every target layer's candidates, appended to a resumable :class:`ProfileStore`."""
from __future__ import annotations

import time
from collections.abc import Collection

import torch
from tqdm.auto import tqdm

from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.factorization.whitening import weight_matrix, whitened_layers
from rocketlm.models.discovery import DecoderStructure
from rocketlm.profiling.profile import LayerProfile, profile_layer
from rocketlm.profiling.store import ProfileStore


def run_profiling(model, structure: DecoderStructure, grams_store: GramStore, store: ProfileStore,
                  config: RocketConfig, value_dtype: torch.dtype, progress: bool = True, dist=None,
                  layers: Collection[str] | None = None, desc: str = "profiling (layers)") -> list[LayerProfile]:
    """Profile every target layer (or every one in ``layers``) not yet in ``store``; returns their
    profiles in model order.

    ``dist``: a :class:`rocketlm.distributed.DistContext`; with several processes the layers are shared
    out and rank 0 returns every profile, the others ``[]`` (``rocketlm.distributed.profiling``)."""
    if dist is not None and dist.distributed:
        from rocketlm.distributed.profiling import profile_parallel
        return profile_parallel(model, structure, grams_store, store, config, value_dtype, progress, dist)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    value_bytes = torch.tensor([], dtype=value_dtype).element_size()
    wanted = set(structure.all_targets if layers is None else layers)
    names = [name for name in structure.all_targets if name in wanted]
    todo = [name for name in names if name not in store]
    with tqdm(total=len(names), initial=len(names) - len(todo), desc=desc, disable=not progress) as bar:
        for name, S, group in whitened_layers(structure, grams_store, lambda n: n in wanted and n not in store,
                                              config.whitening_eps, device):
            start = time.perf_counter()
            profile = profile_layer(name, weight_matrix(modules[name]), S, config.grid, group=group,
                                    value_bytes=value_bytes, ridge_rel=config.ridge_rel,
                                    importance_power=config.importance_power, dtype=dtype,
                                    ks_search=config.ks_search)
            profile.seconds = time.perf_counter() - start
            store.put(profile)
            bar.update(1)
    return [store.layers[name] for name in names]
