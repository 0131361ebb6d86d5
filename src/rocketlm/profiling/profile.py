"""Profile every candidate of the grid for one layer: sizes and both errors.

One whitening and one SVD per layer (:func:`layer_basis`), then every (removed ratio, ks)
candidate reuses them. Candidates whose dictionary would exceed the layer's rank
(``k > min(d_in, d_out)``) or that keep no coefficient (``s == 0``) are not valid and skipped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rocketlm.config import GridConfig
from rocketlm.factorization.sparse_dictionary import (candidate_shape, factorize_candidate, kept_bytes,
                                                      kept_values, layer_basis)


@dataclass(frozen=True)
class Candidate:
    removed_ratio: float  # the grid's nominal removed ratio
    ks: float
    k: int
    s: int
    kept_values: int
    kept_bytes: int
    error_weight: float
    error_output: float


@dataclass
class LayerProfile:
    name: str
    d_in: int
    d_out: int
    dense_values: int
    dense_bytes: int
    group: str  # the Gram group (layers reading the same input share one)
    candidates: list[Candidate]
    seconds: float = 0.0

    def best_ks(self, error: str) -> dict[float, float]:
        """Per removed ratio, the ks of smallest ``error`` ("error_weight" or "error_output")."""
        best: dict[float, Candidate] = {}
        for c in self.candidates:
            if c.removed_ratio not in best or getattr(c, error) < getattr(best[c.removed_ratio], error):
                best[c.removed_ratio] = c
        return {r: c.ks for r, c in sorted(best.items())}

    def to_json(self) -> dict:
        data = asdict(self)
        data["candidates"] = [asdict(c) for c in self.candidates]
        # derived, for a person reading the store: the best ks per removed ratio under each error
        data["best_ks_weight"] = self.best_ks("error_weight")
        data["best_ks_output"] = self.best_ks("error_output")
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LayerProfile":
        data = {k: v for k, v in data.items() if not k.startswith("best_ks_")}
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        return cls(**data)


def valid_shapes(d_in: int, d_out: int, grid: GridConfig) -> list[tuple[float, float, int, int]]:
    """(removed_ratio, ks, k, s) of every valid candidate of the grid for this layer shape."""
    rank = min(d_in, d_out)
    shapes = []
    for removed in grid.removed_ratios:
        for ks in grid.ks:
            k, s = candidate_shape(d_in, d_out, removed, ks)
            if 1 <= s and k <= rank and kept_values(d_in, d_out, k, s) < d_in * d_out:
                shapes.append((removed, ks, k, s))
    return shapes


def profile_layer(name: str, W: torch.Tensor, S: torch.Tensor, grid: GridConfig, *, group: str,
                  value_bytes: int, ridge_rel: float, importance_power: float,
                  dtype: torch.dtype) -> LayerProfile:
    """All candidates of one layer. ``W``: d_in x d_out; ``S``: upper whitening factor (float64)."""
    d_in, d_out = W.shape
    basis = layer_basis(W, S, importance_power=importance_power, dtype=dtype)
    candidates = []
    for removed, ks, k, s in valid_shapes(d_in, d_out, grid):
        fact = factorize_candidate(basis, k, s, ridge_rel=ridge_rel)
        candidates.append(Candidate(
            removed_ratio=removed, ks=ks, k=k, s=s,
            kept_values=kept_values(d_in, d_out, k, s),
            kept_bytes=kept_bytes(d_in, d_out, k, s, value_bytes),
            error_weight=fact.error_weight, error_output=fact.error_output))
    return LayerProfile(name=name, d_in=d_in, d_out=d_out, dense_values=d_in * d_out,
                        dense_bytes=d_in * d_out * value_bytes, group=group, candidates=candidates)
