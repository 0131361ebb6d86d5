"""The profiling stage: every target layer's candidates, appended to a resumable :class:`ProfileStore`."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.factorization.whitening import weight_matrix, whitened_layers
from rocketlm.models.discovery import DecoderStructure
from rocketlm.profiling.profile import LayerProfile, profile_layer
from rocketlm.profiling.store import ProfileStore


def run_profiling(model, structure: DecoderStructure, grams_store: GramStore, store: ProfileStore,
                  config: RocketConfig, value_dtype: torch.dtype, progress: bool = True) -> list[LayerProfile]:
    """Profile every target layer not yet in ``store``; returns all profiles in model order."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    value_bytes = torch.tensor([], dtype=value_dtype).element_size()
    todo = [name for name in structure.all_targets if name not in store]
    with tqdm(total=len(structure.all_targets), initial=len(structure.all_targets) - len(todo),
              desc="profiling (layers)", disable=not progress) as bar:
        for name, S, group in whitened_layers(structure, grams_store, lambda n: n not in store,
                                              config.whitening_eps, device):
            start = time.perf_counter()
            profile = profile_layer(name, weight_matrix(modules[name]), S, config.grid, group=group,
                                    value_bytes=value_bytes, ridge_rel=config.ridge_rel,
                                    importance_power=config.importance_power, dtype=dtype)
            profile.seconds = time.perf_counter() - start
            store.put(profile)
            bar.update(1)
    return [store.layers[name] for name in structure.all_targets]
