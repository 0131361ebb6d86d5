"""Exhaustive reference solver for tests/test_knapsack.py (small instances only)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from rocketlm.allocation.knapsack import KnapsackSolution, lp_lower_bound


def brute_force_mckp(
    removed: Sequence[np.ndarray], error: Sequence[np.ndarray], required_removed: int
) -> KnapsackSolution:
    """Minimum-error choice by trying every combination (``itertools.product``).

    Validates the input and raises InfeasibleBudgetError exactly like ``solve_mckp``, since
    ``lp_lower_bound`` (computed first) does both.
    """
    required = int(required_removed)
    lower_bound = lp_lower_bound(removed, error, required)
    removed_arrays = [np.asarray(r, dtype=np.int64) for r in removed]
    error_arrays = [np.asarray(e, dtype=np.float64) for e in error]
    best = None
    for combo in itertools.product(*[range(r.size) for r in removed_arrays]):
        total_removed = sum(int(removed_arrays[g][c]) for g, c in enumerate(combo))
        if total_removed < required:
            continue
        total_error = float(sum(float(error_arrays[g][c]) for g, c in enumerate(combo)))
        if best is None or total_error < best[0]:
            best = (total_error, total_removed, combo)
    assert best is not None  # lp_lower_bound checked feasibility
    return KnapsackSolution(
        choice=np.asarray(best[2], dtype=np.int64),
        total_error=best[0],
        total_removed=best[1],
        required_removed=required,
        lower_bound=float(lower_bound),
    )
