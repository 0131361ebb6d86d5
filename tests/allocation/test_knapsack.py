"""Tests of the exact multiple-choice knapsack solver (rocketlm.allocation.knapsack)."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from rocketlm.allocation.knapsack import (
    FrontierLimitError,
    InfeasibleBudgetError,
    KnapsackSolution,
    lp_lower_bound,
    solve_mckp,
)
from knapsack_reference import brute_force_mckp

REL = 1e-9


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def _check_solution(sol: KnapsackSolution, removed, error, required: int) -> None:
    assert sol.choice.dtype == np.int64
    assert sol.choice.shape == (len(removed),)
    assert all(0 <= c < len(r) for c, r in zip(sol.choice, removed))
    tot_r = sum(int(removed[g][c]) for g, c in enumerate(sol.choice))
    tot_e = sum(float(error[g][c]) for g, c in enumerate(sol.choice))
    assert tot_r == sol.total_removed
    assert _close(tot_e, sol.total_error)
    assert sol.total_removed >= required
    assert sol.required_removed == required
    assert sol.lower_bound <= sol.total_error + REL * max(1.0, abs(sol.total_error))


def _random_small(rng: np.random.Generator):
    n_groups = int(rng.integers(2, 7))
    small_values = rng.random() < 0.5  # small removed values -> many duplicated sums / ties
    removed, error = [], []
    for _ in range(n_groups):
        m = int(rng.integers(1, 6))
        r = rng.integers(0, 8 if small_values else 10_000, m)
        if rng.random() < 0.3 and m > 1:
            r[1] = r[0]  # duplicated removed value inside a group
        kind = rng.integers(0, 3)
        if kind == 0:
            e = rng.integers(0, 4, m).astype(float)  # many exact ties
        elif kind == 1:
            e = rng.random(m)  # non-monotone
        else:
            e = np.sort(rng.random(m))[np.argsort(np.argsort(r))]  # monotone in removed
        if rng.random() < 0.5:  # a "leave dense" option somewhere
            j = int(rng.integers(0, m))
            r[j], e[j] = 0, 0.0
        removed.append(r.astype(np.int64))
        error.append(e)
    return removed, error


def _realistic(n_groups: int, n_options: int, rng: np.random.Generator, noise: float = 0.15):
    removed, error = [], []
    for _ in range(n_groups):
        size = int(rng.integers(100_000, 1_200_000))
        ratios = np.sort(rng.uniform(0.01, 0.95, n_options - 1))
        err = float(rng.lognormal()) * ratios ** rng.uniform(1.2, 3.0)
        err = err * np.exp(noise * rng.standard_normal(ratios.size))
        removed.append(np.concatenate(([0], np.round(ratios * size).astype(np.int64))))
        error.append(np.concatenate(([0.0], err)))
    return removed, error


def _budget_dp(removed, error, required: int) -> float:
    """Independent exact DP over every integer budget level (small removed values only)."""
    cap = max(required, 0)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for r, e in zip(removed, error):
        new = np.full(cap + 1, np.inf)
        for ri, ei in zip(r, e):
            shifted = np.full(cap + 1, np.inf)
            ri = int(ri)
            if ri >= cap:
                shifted[cap] = best.min() + ei
            else:
                shifted[ri:cap] = best[: cap - ri] + ei
                shifted[cap] = best[cap - ri :].min() + ei
            new = np.minimum(new, shifted)
        best = new
    return float(best[cap])


def _greedy_feasible(removed, error, required: int) -> float:
    """Simple feasible heuristic: all at the min-removed option, then repeatedly apply the
    upgrade with the best marginal error per removed parameter (heap over groups)."""
    import heapq

    pos = [int(np.argmin(np.where(r == r.min(), e, np.inf))) for r, e in zip(removed, error)]
    total = sum(int(r[p]) for r, p in zip(removed, pos))

    def best_upgrade(g):
        r, e = removed[g], error[g]
        gain = r - r[pos[g]]
        ok = gain > 0
        if not ok.any():
            return None
        rate = np.where(ok, (e - e[pos[g]]) / np.maximum(gain, 1), np.inf)
        i = int(np.argmin(rate))
        return (float(rate[i]), g, i, pos[g])

    heap = [u for u in map(best_upgrade, range(len(removed))) if u is not None]
    heapq.heapify(heap)
    while total < required:
        _, g, i, at = heapq.heappop(heap)
        if at != pos[g]:
            continue  # stale entry
        total += int(removed[g][i] - removed[g][pos[g]])
        pos[g] = i
        u = best_upgrade(g)
        if u is not None:
            heapq.heappush(heap, u)
    return float(sum(float(e[p]) for e, p in zip(error, pos)))


# ---------------------------------------------------------------------------
# exactness on small instances
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", range(4))
def test_matches_brute_force_random_small(block):
    for seed in range(50 * block, 50 * (block + 1)):
        rng = np.random.default_rng(seed)
        removed, error = _random_small(rng)
        max_r = sum(int(r.max()) for r in removed)
        for required in {int(rng.integers(-2, max_r + 1)), max_r, 0, max(max_r // 2, 1)}:
            if required > max_r:
                continue
            exp = brute_force_mckp(removed, error, required)
            sol = solve_mckp(removed, error, required)
            _check_solution(sol, removed, error, required)
            assert _close(sol.total_error, exp.total_error), (seed, required, sol, exp)
            assert _close(sol.lower_bound, exp.lower_bound)
            assert _close(lp_lower_bound(removed, error, required), sol.lower_bound)


def test_budget_exactly_met_by_single_combination():
    rng = np.random.default_rng(123)
    for _ in range(30):
        n_groups = int(rng.integers(2, 6))
        removed = [rng.choice(np.arange(1, 10_000), size=int(rng.integers(2, 5)), replace=False) for _ in range(n_groups)]
        error = [rng.random(r.size) for r in removed]
        # Budget equals one particular combination's total.
        combo = [int(rng.integers(0, r.size)) for r in removed]
        required = sum(int(r[c]) for r, c in zip(removed, combo))
        exp = brute_force_mckp(removed, error, required)
        sol = solve_mckp(removed, error, required)
        _check_solution(sol, removed, error, required)
        assert _close(sol.total_error, exp.total_error)


def test_exact_budget_needs_non_greedy_choice():
    # Only one combination reaches 10 exactly: {4, 6}. Anything else overshoots expensively.
    removed = [np.array([0, 4, 9]), np.array([0, 6, 11])]
    error = [np.array([0.0, 1.0, 5.0]), np.array([0.0, 1.0, 5.0])]
    sol = solve_mckp(removed, error, 10)
    assert sol.choice.tolist() == [1, 1]
    assert sol.total_removed == 10
    assert sol.total_error == pytest.approx(2.0)


def test_matches_independent_budget_dp_medium():
    rng = np.random.default_rng(7)
    for _ in range(10):
        n_groups = int(rng.integers(10, 30))
        removed, error = [], []
        for _ in range(n_groups):
            m = int(rng.integers(1, 8))
            r = rng.integers(0, 60, m)
            e = rng.random(m) * (1 + r / 60.0) ** 2
            removed.append(r)
            error.append(e)
        max_r = sum(int(r.max()) for r in removed)
        for frac in (0.1, 0.5, 0.9, 1.0):
            required = int(frac * max_r)
            sol = solve_mckp(removed, error, required)
            _check_solution(sol, removed, error, required)
            assert _close(sol.total_error, _budget_dp(removed, error, required))


# ---------------------------------------------------------------------------
# realistic sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(210, 15), (300, 60)])
@pytest.mark.parametrize("frac", [0.05, 0.3, 0.7])
def test_large_instances_feasible_and_bounded(shape, frac):
    rng = np.random.default_rng(shape[1] * 100 + int(frac * 100))
    removed, error = _realistic(*shape, rng)
    required = int(frac * sum(int(r.max()) for r in removed))
    t0 = time.perf_counter()
    sol = solve_mckp(removed, error, required)
    elapsed = time.perf_counter() - t0
    _check_solution(sol, removed, error, required)
    lb = lp_lower_bound(removed, error, required)
    assert _close(lb, sol.lower_bound)
    assert sol.total_error >= lb - REL * abs(lb)
    assert sol.total_error <= _greedy_feasible(removed, error, required) * (1 + REL)
    assert elapsed < 5.0  # generous: shared CI machines; typical is ~0.05 s


def test_large_instance_matches_budget_dp_with_small_units():
    # Realistic shape, but removed counts in small units so an exhaustive budget DP is affordable.
    rng = np.random.default_rng(11)
    removed, error = [], []
    for _ in range(60):
        size = int(rng.integers(20, 120))
        ratios = np.unique(np.round(np.sort(rng.uniform(0.0, 0.9, 12)) * size).astype(np.int64))
        err = float(rng.lognormal()) * (ratios / size) ** rng.uniform(1.2, 3.0)
        err *= np.exp(0.2 * rng.standard_normal(ratios.size))
        removed.append(np.concatenate(([0], ratios)))
        error.append(np.concatenate(([0.0], err)))
    max_r = sum(int(r.max()) for r in removed)
    for frac in (0.1, 0.4, 0.8):
        required = int(frac * max_r)
        sol = solve_mckp(removed, error, required)
        _check_solution(sol, removed, error, required)
        assert _close(sol.total_error, _budget_dp(removed, error, required))


def test_budget_arithmetic_is_exact_for_huge_integers():
    # Totals beyond 2**53 must not be rounded (float budgets would mis-handle the off-by-one).
    big = 2**55
    removed = [np.array([0, big, big + 1], dtype=np.int64), np.array([0, 1, 3], dtype=np.int64)]
    error = [np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0, 1.5])]
    sol = solve_mckp(removed, error, big + 3)
    assert sol.total_removed >= big + 3
    assert sol.choice.tolist() == [1, 2]
    assert sol.total_error == pytest.approx(2.5)


# ---------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------


def test_infeasible_raises_with_achievable_maximum():
    removed = [np.array([0, 10, 20]), np.array([0, 5])]
    error = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0])]
    with pytest.raises(InfeasibleBudgetError) as exc:
        solve_mckp(removed, error, 26)
    msg = str(exc.value)
    assert "25" in msg and "26" in msg
    assert "ratio" in msg and "target" in msg
    assert exc.value.max_removed == 25
    assert isinstance(exc.value, ValueError)
    with pytest.raises(InfeasibleBudgetError):
        lp_lower_bound(removed, error, 26)
    # Exactly the maximum is feasible.
    sol = solve_mckp(removed, error, 25)
    assert sol.choice.tolist() == [2, 1]


@pytest.mark.parametrize("required", [0, -5])
def test_zero_requirement_gives_dense(required):
    rng = np.random.default_rng(3)
    removed, error = _realistic(50, 10, rng)
    sol = solve_mckp(removed, error, required)
    assert sol.total_error == 0.0
    assert sol.lower_bound == 0.0
    assert sol.total_removed == 0
    assert sol.choice.tolist() == [0] * 50


def test_zero_requirement_without_dense_option_takes_min_error():
    removed = [np.array([5, 3, 9]), np.array([2, 7])]
    error = [np.array([0.5, 0.7, 0.1]), np.array([0.3, 0.2])]
    sol = solve_mckp(removed, error, 0)
    assert sol.choice.tolist() == [2, 1]
    assert sol.total_error == pytest.approx(0.3)


def test_empty_and_invalid_inputs():
    sol = solve_mckp([], [], 0)
    assert sol.choice.shape == (0,) and sol.total_error == 0.0
    with pytest.raises(InfeasibleBudgetError):
        solve_mckp([], [], 1)
    with pytest.raises(ValueError):
        solve_mckp([np.array([0, 1])], [np.array([0.0])], 1)
    with pytest.raises(ValueError):
        solve_mckp([np.array([0, -1])], [np.array([0.0, 1.0])], 0)
    with pytest.raises(ValueError):
        solve_mckp([np.array([0.0, 1.5])], [np.array([0.0, 1.0])], 1)
    with pytest.raises(ValueError):
        solve_mckp([np.array([0, 1])], [np.array([0.0, np.nan])], 1)
    # integral floats and python lists are accepted
    sol = solve_mckp([[0.0, 2.0], [0, 3]], [[0.0, 1.0], [0.0, 2.0]], 2)
    assert sol.choice.tolist() == [1, 0]


def test_frontier_size_logged_at_debug(caplog):
    rng = np.random.default_rng(5)
    removed, error = _realistic(40, 20, rng)
    required = int(0.4 * sum(int(r.max()) for r in removed))
    with caplog.at_level(logging.DEBUG, logger="rocketlm.allocation.knapsack"):
        solve_mckp(removed, error, required)
    assert any("frontier" in rec.getMessage() for rec in caplog.records)


def test_frontier_limit_raises_instead_of_blowing_up():
    # Errors exactly proportional to removed: every option has zero reduced cost and the
    # problem degenerates to subset-sum; the solver must refuse loudly, not approximate.
    rng = np.random.default_rng(0)
    removed = [np.concatenate(([0], rng.integers(10_000, 1_000_000, 14))) for _ in range(50)]
    error = [r * 1e-3 for r in removed]
    required = int(0.4 * sum(int(r.max()) for r in removed))
    with pytest.raises(FrontierLimitError, match="max_states"):
        solve_mckp(removed, error, required, max_states=2_000)
