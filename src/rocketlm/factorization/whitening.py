"""Whitening factors of stored Grams, layer by layer, for the stages that refactor weights."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rocketlm.calibration.store import GramStore
from rocketlm.factorization.sparse_dictionary import whitening_factor
from rocketlm.models.discovery import DecoderStructure


def whitened_layers(structure: DecoderStructure, grams_store: GramStore, wanted: Callable[[str], bool], eps: float,
                    device: torch.device | str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, S, group)`` for every target layer with ``wanted(name)``, block by block: each
    block's Grams are loaded once and each Gram group is whitened once, only when a layer needs it."""
    for b, names in enumerate(structure.targets):
        names = [n for n in names if wanted(n)]
        if not names:
            continue
        grams = grams_store.get(b, device)
        factors: dict[str, torch.Tensor] = {}
        for name in names:
            group = grams.group_of[name]
            if group not in factors:
                factors[group] = whitening_factor(grams.grams[group], eps)
            yield name, factors[group], group


def weight_matrix(module: torch.nn.Linear) -> torch.Tensor:
    """``W`` in ROCKET notation (d_in x d_out), float64."""
    return module.weight.detach().to(torch.float64).T
