"""Exact multiple-choice knapsack (MCKP) solver for layer-wise budget allocation.

Problem
-------
``L`` groups (layers); group ``l`` has options ``i = 0..m_l-1`` with an integer
``removed[l][i] >= 0`` (parameters removed by that option) and a float
``error[l][i]``.  Choose exactly one option per group to **minimise** the summed
error subject to ``sum(removed) >= required_removed``.

Why hand-written
----------------
A general MILP solver gives the same optimum, only slower: on SmolLM2 profiles scipy's
HiGHS (``scipy.optimize.milp``) took 0.67-108 s per solve where this solver takes
0.01-0.08 s.  ``bench/bench_knapsack.py --milp`` repeats the comparison on synthetic
instances.

Algorithm (exact, budget kept in exact integers -- no bucketing of the budget)
-------------------------------------------------------------------------------
1. Per group drop dominated options (another option removes at least as much
   with no larger error) and options beyond the first one that alone already
   meets the whole budget.  What remains is a staircase with strictly
   increasing ``removed`` and strictly increasing ``error``.
2. LP relaxation: the lower convex hull of every staircase gives segments with
   increasing slope (error per removed parameter).  Taking segments greedily by
   slope gives the LP optimum (a lower bound) and, rounding the fractional
   segment up / down-and-repair, plus a slack-reducing local search, a
   feasible incumbent (upper bound).
3. Reduced-cost fixing: with the LP multiplier ``lam`` every solution has
   ``error >= LB + sum_l rc_l`` where ``rc_l = (e - lam*r) - min(e - lam*r)``
   of the chosen option, so a solution with error <= T only uses options with
   ``rc <= T - LB``; on realistic instances almost every group keeps a
   single option.
4. Exact dynamic programme (:class:`_FrontierDP`) over the remaining
   multi-option groups keeping the Pareto frontier of partial states
   ``(removed_so_far capped at the budget, error_so_far)`` with parent pointers.
   A state is pruned when the remaining groups cannot reach the budget, or when
   ``error_so_far + LP_bound(remaining groups, missing) > T`` (plus a small
   tolerance so an optimum is never pruned).  The LP bound of every suffix of
   groups is a convex piecewise-linear function of the missing amount
   evaluated with ``np.interp``.
5. Threshold deepening: T runs through ``LB + gap/256, gap/64, gap/16, gap/4``
   and finally the incumbent.  A DP pruned at T that ends with any state has
   found the optimum (its value is <= T, so the optimal path was never
   pruned); the last pass always succeeds because the incumbent survives.

Candidate generation is chunked and Pareto-compressed on the fly, so memory
is bounded by the (exact) frontier itself; its size is logged at debug level,
a warning is logged when it gets large and FrontierLimitError is raised past
``max_states`` (only reachable on pathological instances whose errors are
exactly proportional to the removed counts, i.e. subset-sum).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rocketlm.errors import RocketError

log = logging.getLogger(__name__)

__all__ = [
    "KnapsackSolution",
    "InfeasibleBudgetError",
    "solve_mckp",
    "lp_lower_bound",
    "FrontierLimitError",
    "DEFAULT_MAX_STATES",
]

# Maximum number of (state, option) candidates materialised at once per DP step.
_CANDIDATE_CHUNK = 1 << 20
# Frontier size above which a warning is logged (the solver stays exact).
_FRONTIER_WARN = 1_000_000
# Default hard limit on the number of DP states stored over all groups (parent
# pointers, 8 bytes each); realistic instances stay below ~1e6.
DEFAULT_MAX_STATES = 10_000_000
# Relative tolerance used when pruning against the incumbent.
_REL_TOL = 1e-9
# Threshold-deepening fractions of the (incumbent - LP bound) gap tried before the incumbent.
_DEEPEN: tuple[float, ...] = (4.0**-4, 4.0**-3, 4.0**-2, 4.0**-1)

# DP states as parallel arrays: removed so far (capped), error so far, flat parent index.
_States = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class KnapsackSolution:
    """Result of a multiple-choice knapsack solve."""

    choice: np.ndarray  # int64, shape (L,), chosen option index per group
    total_error: float
    total_removed: int
    required_removed: int
    lower_bound: float  # LP-relaxation bound (for reporting the gap)
    frontier_max: int = 0  # largest DP frontier of the successful DP pass (diagnostics)
    frontier_total: int = 0  # sum of its frontier sizes over groups (diagnostics)

    @property
    def gap(self) -> float:
        """Relative gap between the solution and the LP lower bound."""
        denom = max(abs(self.total_error), 1e-300)
        return (self.total_error - self.lower_bound) / denom


class InfeasibleBudgetError(RocketError, ValueError):
    """The required removal cannot be reached even by taking every group's max."""

    def __init__(self, required_removed: int, max_removed: int) -> None:
        self.required_removed = int(required_removed)
        self.max_removed = int(max_removed)
        frac = self.max_removed / self.required_removed if self.required_removed else float("nan")
        super().__init__(
            f"infeasible budget: required_removed={self.required_removed} but the largest "
            f"achievable removed amount (every group at its most aggressive option) is "
            f"{self.max_removed} ({frac:.2%} of the requirement). Raise the grid's largest "
            f"removed ratio (add more aggressive options) or lower the compression target "
            f"to at most {self.max_removed} removed parameters."
        )


class FrontierLimitError(RocketError, RuntimeError):
    """The exact DP outgrew ``max_states`` stored states (no approximate answer is returned)."""


# ----------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------


def _as_int_array(values, group: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"removed[{group}] must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
    else:
        as_float = arr.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError(f"removed[{group}] must contain integers, got {arr!r}")
        out = as_float.astype(np.int64)
    if np.any(out < 0):
        raise ValueError(f"removed[{group}] must be >= 0")
    return out


def _validate(removed, error) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(removed) != len(error):
        raise ValueError(f"removed has {len(removed)} groups but error has {len(error)}")
    removed_arrays, error_arrays = [], []
    for group, (group_removed, group_error) in enumerate(zip(removed, error)):
        group_removed = _as_int_array(group_removed, group)
        group_error = np.asarray(group_error, dtype=np.float64)
        if group_error.ndim != 1 or group_error.shape != group_removed.shape:
            raise ValueError(f"group {group}: removed shape {group_removed.shape} != error shape {group_error.shape}")
        if group_removed.size == 0:
            raise ValueError(f"group {group} has no options")
        if not np.all(np.isfinite(group_error)):
            raise ValueError(f"group {group}: errors must be finite")
        removed_arrays.append(group_removed)
        error_arrays.append(group_error)
    return removed_arrays, error_arrays


def _check_feasible(removed_arrays: list[np.ndarray], required: int) -> None:
    max_removed = sum(int(group_removed.max()) for group_removed in removed_arrays)
    if max_removed < required:
        raise InfeasibleBudgetError(required, max_removed)


def _staircase(removed: np.ndarray, error: np.ndarray, cap: int) -> np.ndarray:
    """Original indices of the non-dominated options, sorted by increasing removed.

    Along the result both removed and error are strictly increasing.  Options
    after the first one with ``removed >= cap`` are dropped (they cannot help).
    """
    order = np.lexsort((error, -removed))  # removed descending, then error ascending (stable)
    sorted_error = error[order]
    keep = np.empty(sorted_error.size, dtype=bool)
    keep[0] = True
    if sorted_error.size > 1:
        keep[1:] = sorted_error[1:] < np.minimum.accumulate(sorted_error)[:-1]
    index = order[keep][::-1]
    first_full = int(np.searchsorted(removed[index], cap, side="left"))
    if first_full < index.size:
        index = index[: first_full + 1]
    return index


def _lower_hull(x: np.ndarray, y: np.ndarray, endpoint: np.ndarray) -> np.ndarray:
    """Indices of the points left after peeling every non-endpoint on or above its neighbours' chord.

    ``x``/``y`` are the concatenated staircases and ``endpoint`` marks each staircase's first and
    last point, so the peeling never crosses from one group into the next.
    """
    hull = np.arange(x.size)
    while hull.size >= 3:
        a, i, b = hull[:-2], hull[1:-1], hull[2:]
        # i lies on or above the chord a-b (a, b in the same group whenever i is interior)
        above = (y[i] - y[a]) * (x[b] - x[a]) >= (y[b] - y[a]) * (x[i] - x[a])
        drop = above & ~endpoint[i]
        if not drop.any():
            break
        keep = np.ones(hull.size, dtype=bool)
        keep[1:-1] = ~drop
        hull = hull[keep]
    return hull


class _Prepared:
    """Staircases (flat, concatenated over groups), convex hulls and LP relaxation."""

    def __init__(self, flat_removed: np.ndarray, flat_error: np.ndarray, flat_index: np.ndarray,
                 sizes: np.ndarray, required: int) -> None:
        self.required = int(required)
        self.cap = max(self.required, 0)
        self.n_groups = int(sizes.size)
        self.flat_removed, self.flat_error, self.flat_index = flat_removed, flat_error, flat_index
        self.sizes = sizes.astype(np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)
        ends = self.starts + self.sizes
        self.group_removed = [flat_removed[a:b] for a, b in zip(self.starts, ends)]
        self.group_error = [flat_error[a:b] for a, b in zip(self.starts, ends)]
        if self.n_groups:
            self.base_removed = flat_removed[self.starts]
            self.base_error = flat_error[self.starts]
            self.err_scale = float(np.abs(flat_error).max()) * self.n_groups
        else:
            self.base_removed = np.zeros(0, np.int64)
            self.base_error = np.zeros(0)
            self.err_scale = 0.0
        self._hulls()
        self._lp()

    @classmethod
    def build(cls, removed_arrays: list[np.ndarray], error_arrays: list[np.ndarray], required: int) -> _Prepared:
        cap = max(int(required), 0)
        index = [_staircase(r, e, cap) for r, e in zip(removed_arrays, error_arrays)]
        if not index:
            empty = np.zeros(0, np.int64)
            return cls(empty, np.zeros(0), empty, empty, required)
        return cls(
            np.concatenate([r[i] for r, i in zip(removed_arrays, index)]),
            np.concatenate([e[i] for e, i in zip(error_arrays, index)]),
            np.concatenate(index),
            np.array([i.size for i in index], dtype=np.int64),
            required,
        )

    def subset(self, keep: np.ndarray) -> _Prepared:
        """Same instance restricted to the flat options where ``keep`` is True (>= 1 per group)."""
        sizes = np.add.reduceat(keep.astype(np.int64), self.starts) if self.n_groups else self.sizes
        return _Prepared(self.flat_removed[keep], self.flat_error[keep], self.flat_index[keep], sizes, self.required)

    def max_removed(self) -> int:
        return int(self.flat_removed[self.starts + self.sizes - 1].sum()) if self.n_groups else 0

    def _hulls(self) -> None:
        """Hull segments of all staircases at once: removed/error step, slope, group, end index."""
        if self.n_groups == 0:
            self.seg_removed = np.zeros(0, np.int64)
            self.seg_error = np.zeros(0)
            self.seg_slope = np.zeros(0)
            self.seg_group = np.zeros(0, np.int64)
            self.seg_end = np.zeros(0, np.int64)
            return
        x = self.flat_removed.astype(np.float64)
        y = self.flat_error
        group_of = np.repeat(np.arange(self.n_groups), self.sizes)
        local = np.arange(x.size) - np.repeat(self.starts, self.sizes)
        endpoint = np.zeros(x.size, dtype=bool)
        endpoint[self.starts] = True
        endpoint[self.starts + self.sizes - 1] = True
        hull = _lower_hull(x, y, endpoint)
        same = group_of[hull[1:]] == group_of[hull[:-1]]
        seg_start, seg_stop = hull[:-1][same], hull[1:][same]
        self.seg_group = group_of[seg_start]
        self.seg_removed = self.flat_removed[seg_stop] - self.flat_removed[seg_start]
        self.seg_error = y[seg_stop] - y[seg_start]
        self.seg_slope = self.seg_error / self.seg_removed
        self.seg_end = local[seg_stop]  # staircase index reached when the segment is taken

    def _lp(self) -> None:
        """LP optimum: take segments by slope; ``critical`` is the fractional one (-1 if none is needed)."""
        # Sort segments by slope; ties by group then position so a group's segments stay in order.
        self.seg_order = np.lexsort((self.seg_end, self.seg_group, self.seg_slope))
        sum_base_removed = int(self.base_removed.sum())
        sum_base_error = float(self.base_error.sum())
        missing = self.cap - sum_base_removed
        step_removed = self.seg_removed[self.seg_order]
        step_error = self.seg_error[self.seg_order]
        cum_removed = np.cumsum(step_removed)
        if missing <= 0:
            self.lower_bound = sum_base_error
            self.critical = -1
            return
        critical = int(np.searchsorted(cum_removed, missing, side="left"))  # first segment completing it
        if critical >= cum_removed.size:  # should have been caught by the feasibility check
            reachable = int(cum_removed[-1] if cum_removed.size else 0)
            raise InfeasibleBudgetError(self.required, sum_base_removed + reachable)
        removed_before = int(cum_removed[critical - 1]) if critical > 0 else 0
        frac = (missing - removed_before) / float(step_removed[critical])
        self.lower_bound = (sum_base_error + float(step_error[:critical].sum())
                            + frac * float(step_error[critical]))
        self.critical = critical

    # -- incumbent --------------------------------------------------------

    def _choice_from_segments(self, n_taken: int) -> np.ndarray:
        """Staircase index per group after taking the first ``n_taken`` sorted segments."""
        pos = np.zeros(self.n_groups, dtype=np.int64)
        taken = self.seg_order[:n_taken]
        if taken.size:
            np.maximum.at(pos, self.seg_group[taken], self.seg_end[taken])
        return pos

    def removed_of(self, pos: np.ndarray) -> int:
        return int(self.flat_removed[self.starts + pos].sum())

    def error_of(self, pos: np.ndarray) -> float:
        return float(self.flat_error[self.starts + pos].sum())

    def _first_at_least(self, target: np.ndarray) -> np.ndarray:
        """Per group, the first staircase index with removed >= target[g] (== size if none)."""
        below = self.flat_removed < np.repeat(target, self.sizes)
        return np.add.reduceat(below.astype(np.int64), self.starts)

    def _reduce_slack(self, pos: np.ndarray) -> np.ndarray:
        """Greedy local search: step groups down while the budget stays satisfied."""
        pos = pos.copy()
        slack = self.removed_of(pos) - self.cap
        while slack > 0:
            current = self.starts + pos
            lower = self._first_at_least(self.flat_removed[current] - slack)
            gain = self.flat_error[current] - self.flat_error[self.starts + lower]
            gain[lower >= pos] = 0.0
            group = int(np.argmax(gain))
            if gain[group] <= 0.0:
                break
            slack -= int(self.flat_removed[current[group]] - self.flat_removed[self.starts[group] + lower[group]])
            pos[group] = lower[group]
        return pos

    def _round_down_and_repair(self) -> np.ndarray | None:
        """Drop the critical segment, then cover the deficit with the cheapest single-group upgrade."""
        down = self._choice_from_segments(self.critical)
        deficit = self.cap - self.removed_of(down)
        current = self.starts + down
        upgrade = self._first_at_least(self.flat_removed[current] + deficit)
        possible = upgrade < self.sizes
        if not possible.any():
            return None
        upgraded_error = self.flat_error[self.starts + np.minimum(upgrade, self.sizes - 1)]
        cost = np.where(possible, upgraded_error - self.flat_error[current], np.inf)
        group = int(np.argmin(cost))
        down = down.copy()
        down[group] = upgrade[group]
        return down

    def incumbent(self) -> np.ndarray:
        """A good feasible solution (staircase indices) from the LP relaxation."""
        if self.critical < 0:
            return np.zeros(self.n_groups, dtype=np.int64)
        candidates = [self._choice_from_segments(self.critical + 1)]  # round the critical group up
        repaired = self._round_down_and_repair()
        if repaired is not None:
            candidates.append(repaired)
        candidates = [self._reduce_slack(c) for c in candidates]
        errors = [self.error_of(c) for c in candidates]
        return candidates[int(np.argmin(errors))]

    def to_original(self, pos: np.ndarray) -> np.ndarray:
        return self.flat_index[self.starts + pos].astype(np.int64)


# ----------------------------------------------------------------------------
# exact DP (step 4 of the module docstring)
# ----------------------------------------------------------------------------


def _group_order(prep: _Prepared) -> np.ndarray:
    """DP processing order of the groups with more than one option: decreasing removed range."""
    multi = np.flatnonzero(prep.sizes > 1)
    removed_range = np.array([int(prep.group_removed[g][-1] - prep.group_removed[g][0]) for g in multi],
                             dtype=np.int64)
    return multi[np.argsort(-removed_range, kind="stable")].astype(np.int64)


def _pareto_merge(acc_removed: np.ndarray, acc_error: np.ndarray, acc_parent: np.ndarray,
                  pending: list[_States]) -> _States:
    """Non-dominated states of ``acc`` plus the ``pending`` chunks, sorted by removed ascending.

    A state is kept when every state removing at least as much has a strictly larger error.
    """
    merged_removed = np.concatenate([acc_removed] + [p[0] for p in pending])
    merged_error = np.concatenate([acc_error] + [p[1] for p in pending])
    merged_parent = np.concatenate([acc_parent] + [p[2] for p in pending])
    if merged_removed.size <= 1:
        return merged_removed, merged_error, merged_parent
    order = np.lexsort((merged_error, -merged_removed))  # removed descending, error ascending
    sorted_error = merged_error[order]
    keep = np.empty(order.size, dtype=bool)
    keep[0] = True
    keep[1:] = sorted_error[1:] < np.minimum.accumulate(sorted_error)[:-1]
    selected = order[keep][::-1]
    return merged_removed[selected], merged_error[selected], merged_parent[selected]


@dataclass(frozen=True)
class _Breakpoints:
    """A convex piecewise-linear lower bound on the error still to come, by missing removed amount."""

    max_missing: int  # the most the groups can still remove (a larger missing amount is unreachable)
    missing: np.ndarray  # float64 breakpoints, increasing
    error: np.ndarray


class _SuffixBound:
    """LP bound of the groups after each DP step, as breakpoints of a convex piecewise-linear
    function of the missing removed amount."""

    def __init__(self, prep: _Prepared, order: np.ndarray) -> None:
        n_steps = order.size
        rank = np.full(prep.n_groups, -1, dtype=np.int64)
        rank[order] = np.arange(n_steps)
        seg_order = prep.seg_order  # segments sorted by slope, with the DP rank of their group
        self.seg_removed = prep.seg_removed[seg_order]
        self.seg_error = prep.seg_error[seg_order]
        self.seg_rank = rank[prep.seg_group[seg_order]] if seg_order.size else np.zeros(0, np.int64)
        self.base_removed = np.zeros(n_steps + 1, dtype=np.int64)
        self.base_error = np.zeros(n_steps + 1, dtype=np.float64)
        self.base_removed[:n_steps] = np.cumsum(prep.base_removed[order][::-1])[::-1]
        self.base_error[:n_steps] = np.cumsum(prep.base_error[order][::-1])[::-1]

    def after(self, step: int) -> _Breakpoints:
        """The LP bound of the groups after DP step ``step``."""
        later = self.seg_rank > step
        missing = np.concatenate(([0], np.cumsum(self.seg_removed[later]))) + self.base_removed[step + 1]
        error = np.concatenate(([0.0], np.cumsum(self.seg_error[later]))) + self.base_error[step + 1]
        return _Breakpoints(int(missing[-1]), missing.astype(np.float64), error)


class _FrontierDP:
    """Pareto-frontier DP over the multi-option groups of ``prep``, pruned at ``thresh``.

    :meth:`run` returns the staircase position per group of a minimum-error solution among
    those with error <= thresh (and the frontier size of every step), or None when no such
    solution exists.
    """

    def __init__(self, prep: _Prepared, thresh: float, max_states: int) -> None:
        self.prep, self.thresh, self.max_states = prep, thresh, max_states
        # Groups with a single option are fixed; the DP runs over the others only.
        self.order = _group_order(prep)
        self.n_steps = int(self.order.size)
        self.bound = _SuffixBound(prep, self.order)
        self.history: list[np.ndarray] = []  # per step: flat index (parent * m + option) of each state
        self.sizes: list[int] = []
        self.stored = 0
        self.warned = False

    def run(self) -> tuple[np.ndarray, list[int]] | None:
        prep, cap = self.prep, self.prep.cap
        fixed = prep.sizes == 1
        frontier_removed = np.array([min(int(prep.base_removed[fixed].sum()), cap)], dtype=np.int64)
        frontier_error = np.array([float(prep.base_error[fixed].sum())], dtype=np.float64)
        if self.n_steps == 0 and (frontier_removed[0] < cap or frontier_error[0] > self.thresh):
            return None
        for step in range(self.n_steps):
            frontier_removed, frontier_error, parents = self._step(step, frontier_removed, frontier_error)
            if frontier_removed.size == 0:
                log.debug("MCKP DP at threshold %.9g: all states pruned at group %d/%d",
                          self.thresh, step + 1, self.n_steps)
                return None
            self._record(step, parents)
        pos = self._backtrack(frontier_error)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "MCKP DP at threshold %.9g: staircase sizes mean %.2f, %d free groups, frontier max %d, total %d",
                self.thresh, float(prep.sizes.mean()) if prep.n_groups else 0.0, self.n_steps,
                max(self.sizes, default=0), sum(self.sizes),
            )
        return pos, self.sizes

    def _step(self, step: int, frontier_removed: np.ndarray, frontier_error: np.ndarray) -> _States:
        """Extend every state by every option of the step's group; the unpruned Pareto frontier."""
        group = int(self.order[step])
        option_removed, option_error = self.prep.group_removed[group], self.prep.group_error[group]
        n_options = option_removed.size
        bound = self.bound.after(step)
        rows = max(1, _CANDIDATE_CHUNK // n_options)
        kept = (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))
        pending: list[_States] = []
        n_pending = 0
        for start in range(0, frontier_removed.size, rows):
            cum_removed, cum_error, flat = self._candidates(
                frontier_removed[start : start + rows], frontier_error[start : start + rows],
                option_removed, option_error, bound)
            pending.append((cum_removed, cum_error, flat + start * n_options))
            n_pending += flat.size
            if n_pending > 4 * _CANDIDATE_CHUNK:  # keep memory bounded: compress as we go
                kept = _pareto_merge(*kept, pending)
                pending, n_pending = [], 0
                self._check_limit(kept[0].size, self.stored + kept[0].size, step)
        return _pareto_merge(*kept, pending)

    def _candidates(self, rows_removed: np.ndarray, rows_error: np.ndarray, option_removed: np.ndarray,
                    option_error: np.ndarray, bound: _Breakpoints) -> _States:
        """Unpruned (state, option) pairs of a chunk of states: removed, error, flat row-major index."""
        cap = self.prep.cap
        cum_removed = rows_removed[:, None] + option_removed[None, :]
        np.minimum(cum_removed, cap, out=cum_removed)
        cum_error = rows_error[:, None] + option_error[None, :]
        missing = cap - cum_removed
        ok = missing <= bound.max_missing  # the remaining groups can still reach the budget
        ok &= cum_error + np.interp(missing.astype(np.float64), bound.missing, bound.error) <= self.thresh
        flat = np.flatnonzero(ok.ravel())
        return cum_removed.ravel()[flat], cum_error.ravel()[flat], flat

    def _record(self, step: int, parents: np.ndarray) -> None:
        self.stored += parents.size
        self._check_limit(parents.size, self.stored, step)
        self.history.append(parents)
        self.sizes.append(int(parents.size))
        if not self.warned and parents.size > _FRONTIER_WARN:
            self.warned = True
            log.warning("MCKP frontier has %d states at group %d/%d (solve stays exact; %d states stored)",
                        parents.size, step + 1, self.n_steps, self.stored)

    def _check_limit(self, frontier: int, stored: int, step: int) -> None:
        if stored > self.max_states:
            raise FrontierLimitError(
                f"exact MCKP DP needs more than max_states={self.max_states} stored states (frontier of "
                f"{frontier} states at group {step + 1}/{self.n_steps}). This happens when errors are (almost) "
                "exactly proportional to the removed counts, which turns the problem into subset-sum; raise "
                "max_states if the memory is available (about 8 bytes per stored state)."
            )

    def _backtrack(self, final_error: np.ndarray) -> np.ndarray:
        """Staircase position per group of the cheapest final state (all final states meet the budget)."""
        pos = np.zeros(self.prep.n_groups, dtype=np.int64)
        if self.n_steps == 0:
            return pos
        state = int(np.argmin(final_error))
        for step in range(self.n_steps - 1, -1, -1):
            group = int(self.order[step])
            n_options = self.prep.group_removed[group].size
            flat = int(self.history[step][state])
            pos[group] = flat % n_options
            state = flat // n_options
        return pos


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def lp_lower_bound(removed: Sequence[np.ndarray], error: Sequence[np.ndarray], required_removed: int) -> float:
    """LP-relaxation lower bound of the MCKP (raises InfeasibleBudgetError if infeasible)."""
    removed_arrays, error_arrays = _validate(removed, error)
    _check_feasible(removed_arrays, int(required_removed))
    return _Prepared.build(removed_arrays, error_arrays, int(required_removed)).lower_bound


def _reduced_costs(full: _Prepared) -> np.ndarray:
    """Reduced cost of every flat option w.r.t. the LP multiplier (step 3 of the module docstring)."""
    lam = float(full.seg_slope[full.seg_order[full.critical]]) if full.critical >= 0 else 0.0
    value = full.flat_error - lam * full.flat_removed.astype(np.float64)
    if not full.n_groups:
        return value
    return value - np.repeat(np.minimum.reduceat(value, full.starts), full.sizes)


def _deepen(full: _Prepared, upper_bound: float, tol: float, max_states: int) -> tuple[np.ndarray, list[int]]:
    """Threshold deepening (step 5): the original choice and DP frontier sizes of the optimum."""
    lower_bound = full.lower_bound
    reduced_cost = _reduced_costs(full)
    gap = upper_bound - lower_bound
    thresholds = [lower_bound + f * gap for f in _DEEPEN if f * gap > tol] + [upper_bound]
    for threshold in thresholds:
        thresh = threshold + tol
        sub = full.subset(reduced_cost <= thresh - lower_bound + tol)
        if sub.max_removed() < full.cap:
            continue
        result = _FrontierDP(sub, thresh, max_states).run()
        if result is not None:
            pos, sizes = result
            return sub.to_original(pos), sizes
    raise RuntimeError(
        "MCKP dynamic programme found no solution at the incumbent threshold; this indicates "
        f"a numerical problem (incumbent={upper_bound!r}, lower bound={lower_bound!r})"
    )


def _totals(choice: np.ndarray, removed_arrays: list[np.ndarray], error_arrays: list[np.ndarray]) -> tuple[int, float]:
    total_removed = int(sum(int(removed_arrays[g][c]) for g, c in enumerate(choice)))
    total_error = float(sum(float(error_arrays[g][c]) for g, c in enumerate(choice)))
    return total_removed, total_error


def solve_mckp(
    removed: Sequence[np.ndarray],
    error: Sequence[np.ndarray],
    required_removed: int,
    *,
    max_states: int = DEFAULT_MAX_STATES,
) -> KnapsackSolution:
    """Exactly solve ``min sum error  s.t.  sum removed >= required_removed`` (one option per group).

    Raises InfeasibleBudgetError when even the most aggressive option of every
    group does not remove ``required_removed`` parameters, and
    FrontierLimitError when the exact DP would store more than ``max_states``
    states in total (pathological near-linear instances; realistic ones stay far below).
    """
    required = int(required_removed)
    removed_arrays, error_arrays = _validate(removed, error)
    _check_feasible(removed_arrays, required)
    full = _Prepared.build(removed_arrays, error_arrays, required)
    lower_bound = full.lower_bound
    incumbent_pos = full.incumbent()
    incumbent_error = full.error_of(incumbent_pos)
    tol = _REL_TOL * max(abs(incumbent_error), abs(lower_bound)) + 1e-12 * full.err_scale + 1e-300
    choice, sizes = _deepen(full, incumbent_error, tol, int(max_states))
    total_removed, total_error = _totals(choice, removed_arrays, error_arrays)
    if total_error > incumbent_error:  # only possible through rounding; never return worse than the incumbent
        choice = full.to_original(incumbent_pos)
        total_removed, total_error = _totals(choice, removed_arrays, error_arrays)[0], incumbent_error
    if total_removed < required:
        raise RuntimeError("internal error: MCKP solution violates the budget")
    log.debug("MCKP: %d groups, LB %.9g, incumbent %.9g, optimum %.9g, frontier max %d",
              len(removed_arrays), lower_bound, incumbent_error, total_error, max(sizes, default=0))
    return KnapsackSolution(
        choice=choice,
        total_error=total_error,
        total_removed=total_removed,
        required_removed=required,
        lower_bound=float(lower_bound),
        frontier_max=max(sizes, default=0),
        frontier_total=sum(sizes),
    )
