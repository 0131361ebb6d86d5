"""Whitening factors of stored Grams, layer by layer, for the stages that refactor weights."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rocketlm.calibration.store import GramStore
from rocketlm.factorization.sparse_dictionary import whitening_factor
from rocketlm.models.discovery import DecoderStructure


def whitened_layers(structure: DecoderStructure, grams_store: GramStore, wanted: Callable[[str], bool], eps: float,
                    device: torch.device | str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, S, group)`` for every target layer with ``wanted(name)``, block by block and, inside a
    block, Gram group by Gram group: each group's Gram is read from the store and whitened once, only when a
    layer needs it, and dropped (with its factor) before the next group's is read, so at most one Gram and
    one factor are held at a time (the widest layer's set the peak memory of an offloaded run)."""
    for b, names in enumerate(structure.targets):
        names = [n for n in names if wanted(n)]
        if not names:
            continue
        group_of = grams_store.group_of(b)
        first = {}
        for i, name in enumerate(names):
            first.setdefault(group_of[name], i)
        current, S = None, None
        for name in sorted(names, key=lambda n: first[group_of[n]]):  # a group's layers together
            group = group_of[name]
            if group != current:
                S = None
                S = whitening_factor(grams_store.get_group(b, group, device), eps)
                current = group
            yield name, S, group


def weight_matrix(module: torch.nn.Linear) -> torch.Tensor:
    """``W`` in ROCKET notation (d_in x d_out), float64."""
    return module.weight.detach().to(torch.float64).T
