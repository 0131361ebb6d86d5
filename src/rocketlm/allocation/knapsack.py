"""Exact multiple-choice knapsack (MCKP) solver for layer-wise budget allocation.

Problem
-------
``L`` groups (layers); group ``l`` has options ``i = 0..m_l-1`` with an integer
``removed[l][i] >= 0`` (parameters removed by that option) and a float
``error[l][i]``.  Choose exactly one option per group to **minimise** the summed
error subject to ``sum(removed) >= required_removed``.

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
4. Exact dynamic programme over the remaining multi-option groups keeping the
   Pareto frontier of partial states ``(removed_so_far capped at the budget,
   error_so_far)`` with parent pointers.  A state is pruned when the remaining
   groups cannot reach the budget, or when
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

import itertools
import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "KnapsackSolution",
    "InfeasibleBudgetError",
    "solve_mckp",
    "brute_force_mckp",
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
_DEEPEN: Tuple[float, ...] = (4.0**-4, 4.0**-3, 4.0**-2, 4.0**-1)


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


class InfeasibleBudgetError(ValueError):
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


class FrontierLimitError(RuntimeError):
    """The exact DP outgrew ``max_states`` stored states (no approximate answer is returned)."""


# ----------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------


def _as_int_array(values, g: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"removed[{g}] must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        out = arr.astype(np.int64)
    else:
        farr = arr.astype(np.float64)
        if not np.all(np.isfinite(farr)) or np.any(farr != np.round(farr)):
            raise ValueError(f"removed[{g}] must contain integers, got {arr!r}")
        out = farr.astype(np.int64)
    if np.any(out < 0):
        raise ValueError(f"removed[{g}] must be >= 0")
    return out


def _validate(removed, error) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    if len(removed) != len(error):
        raise ValueError(f"removed has {len(removed)} groups but error has {len(error)}")
    rs, es = [], []
    for g, (r, e) in enumerate(zip(removed, error)):
        r = _as_int_array(r, g)
        e = np.asarray(e, dtype=np.float64)
        if e.ndim != 1 or e.shape != r.shape:
            raise ValueError(f"group {g}: removed shape {r.shape} != error shape {e.shape}")
        if r.size == 0:
            raise ValueError(f"group {g} has no options")
        if not np.all(np.isfinite(e)):
            raise ValueError(f"group {g}: errors must be finite")
        rs.append(r)
        es.append(e)
    return rs, es


def _check_feasible(rs: List[np.ndarray], required: int) -> None:
    max_removed = sum(int(r.max()) for r in rs)
    if max_removed < required:
        raise InfeasibleBudgetError(required, max_removed)


def _staircase(r: np.ndarray, e: np.ndarray, cap: int) -> np.ndarray:
    """Original indices of the non-dominated options, sorted by increasing removed.

    Along the result both removed and error are strictly increasing.  Options
    after the first one with ``removed >= cap`` are dropped (they cannot help).
    """
    order = np.lexsort((e, -r))  # removed descending, then error ascending (stable)
    es = e[order]
    keep = np.empty(es.size, dtype=bool)
    keep[0] = True
    if es.size > 1:
        keep[1:] = es[1:] < np.minimum.accumulate(es)[:-1]
    idx = order[keep][::-1]
    j = int(np.searchsorted(r[idx], cap, side="left"))
    if j < idx.size:
        idx = idx[: j + 1]
    return idx


class _Prepared:
    """Staircases (flat, concatenated over groups), convex hulls and LP relaxation."""

    def __init__(self, flat_r: np.ndarray, flat_e: np.ndarray, flat_idx: np.ndarray,
                 sizes: np.ndarray, required: int) -> None:
        self.required = int(required)
        self.cap = max(self.required, 0)
        self.n_groups = int(sizes.size)
        self.flat_r, self.flat_e, self.flat_idx = flat_r, flat_e, flat_idx
        self.sizes = sizes.astype(np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)
        ends = self.starts + self.sizes
        self.pr = [flat_r[a:b] for a, b in zip(self.starts, ends)]
        self.pe = [flat_e[a:b] for a, b in zip(self.starts, ends)]
        self.idx = [flat_idx[a:b] for a, b in zip(self.starts, ends)]
        if self.n_groups:
            self.base_r = flat_r[self.starts]
            self.base_e = flat_e[self.starts]
            self.err_scale = float(np.abs(flat_e).max()) * self.n_groups
        else:
            self.base_r = np.zeros(0, np.int64)
            self.base_e = np.zeros(0)
            self.err_scale = 0.0
        self._hulls()
        self._lp()

    @classmethod
    def build(cls, rs: List[np.ndarray], es: List[np.ndarray], required: int) -> "_Prepared":
        cap = max(int(required), 0)
        idx = [_staircase(r, e, cap) for r, e in zip(rs, es)]
        if not idx:
            z = np.zeros(0, np.int64)
            return cls(z, np.zeros(0), z, z, required)
        return cls(
            np.concatenate([r[i] for r, i in zip(rs, idx)]),
            np.concatenate([e[i] for e, i in zip(es, idx)]),
            np.concatenate(idx),
            np.array([i.size for i in idx], dtype=np.int64),
            required,
        )

    def subset(self, keep: np.ndarray) -> "_Prepared":
        """Same instance restricted to the flat options where ``keep`` is True (>= 1 per group)."""
        sizes = np.add.reduceat(keep.astype(np.int64), self.starts) if self.n_groups else self.sizes
        return _Prepared(self.flat_r[keep], self.flat_e[keep], self.flat_idx[keep], sizes, self.required)

    def max_removed(self) -> int:
        return int(self.flat_r[self.starts + self.sizes - 1].sum()) if self.n_groups else 0

    def _hulls(self) -> None:
        """Lower convex hull of all staircases at once (vectorised peeling)."""
        L = self.n_groups
        if L == 0:
            self.seg_dr = np.zeros(0, np.int64)
            self.seg_de = np.zeros(0)
            self.seg_slope = np.zeros(0)
            self.seg_group = np.zeros(0, np.int64)
            self.seg_end = np.zeros(0, np.int64)
            return
        X = self.flat_r.astype(np.float64)
        Y = self.flat_e
        G = np.repeat(np.arange(L), self.sizes)
        starts = self.starts
        local = np.arange(X.size) - np.repeat(starts, self.sizes)
        endpoint = np.zeros(X.size, dtype=bool)
        endpoint[starts] = True
        endpoint[starts + self.sizes - 1] = True
        cur = np.arange(X.size)
        while True:
            if cur.size < 3:
                break
            a, i, b = cur[:-2], cur[1:-1], cur[2:]
            # i lies on or above the chord a-b (a, b in the same group whenever i is interior)
            above = (Y[i] - Y[a]) * (X[b] - X[a]) >= (Y[b] - Y[a]) * (X[i] - X[a])
            drop = above & ~endpoint[i]
            if not drop.any():
                break
            keep = np.ones(cur.size, dtype=bool)
            keep[1:-1] = ~drop
            cur = cur[keep]
        same = G[cur[1:]] == G[cur[:-1]]
        s0, s1 = cur[:-1][same], cur[1:][same]
        self.seg_group = G[s0]
        self.seg_dr = self.flat_r[s1] - self.flat_r[s0]
        self.seg_de = Y[s1] - Y[s0]
        self.seg_slope = self.seg_de / self.seg_dr
        self.seg_end = local[s1]  # staircase index reached when the segment is taken

    def _lp(self) -> None:
        # Sort segments by slope; ties by group then position so a group's segments stay in order.
        self.seg_order = np.lexsort((self.seg_end, self.seg_group, self.seg_slope))
        self.sum_base_r = int(self.base_r.sum())
        self.sum_base_e = float(self.base_e.sum())
        need = self.cap - self.sum_base_r
        dr = self.seg_dr[self.seg_order]
        de = self.seg_de[self.seg_order]
        cum = np.cumsum(dr)
        if need <= 0:
            self.lower_bound = self.sum_base_e
            self.n_full = 0
            self.critical = -1
            return
        c = int(np.searchsorted(cum, need, side="left"))  # first segment completing the need
        if c >= cum.size:  # should have been caught by the feasibility check
            raise InfeasibleBudgetError(self.required, self.sum_base_r + int(cum[-1] if cum.size else 0))
        before = int(cum[c - 1]) if c > 0 else 0
        frac = (need - before) / float(dr[c])
        self.lower_bound = self.sum_base_e + float(de[:c].sum()) + frac * float(de[c])
        self.n_full = c
        self.critical = c

    # -- incumbent --------------------------------------------------------

    def _choice_from_segments(self, n_taken: int) -> np.ndarray:
        """Staircase index per group after taking the first ``n_taken`` sorted segments."""
        pos = np.zeros(self.n_groups, dtype=np.int64)
        taken = self.seg_order[:n_taken]
        if taken.size:
            np.maximum.at(pos, self.seg_group[taken], self.seg_end[taken])
        return pos

    def _removed_of(self, pos: np.ndarray) -> int:
        return int(self.flat_r[self.starts + pos].sum())

    def _error_of(self, pos: np.ndarray) -> float:
        return float(self.flat_e[self.starts + pos].sum())

    def _first_at_least(self, target: np.ndarray) -> np.ndarray:
        """Per group, the first staircase index with removed >= target[g] (== size if none)."""
        below = self.flat_r < np.repeat(target, self.sizes)
        return np.add.reduceat(below.astype(np.int64), self.starts)

    def _reduce_slack(self, pos: np.ndarray) -> np.ndarray:
        """Greedy local search: step groups down while the budget stays satisfied."""
        pos = pos.copy()
        slack = self._removed_of(pos) - self.cap
        while slack > 0:
            cur = self.starts + pos
            q = self._first_at_least(self.flat_r[cur] - slack)
            gain = self.flat_e[cur] - self.flat_e[self.starts + q]
            gain[q >= pos] = 0.0
            g = int(np.argmax(gain))
            if gain[g] <= 0.0:
                break
            slack -= int(self.flat_r[cur[g]] - self.flat_r[self.starts[g] + q[g]])
            pos[g] = q[g]
        return pos

    def incumbent(self) -> np.ndarray:
        """A good feasible solution (staircase indices) from the LP relaxation."""
        if self.critical < 0:
            return np.zeros(self.n_groups, dtype=np.int64)
        cands = [self._choice_from_segments(self.critical + 1)]  # round the critical group up
        # Round down, then repair the deficit with the cheapest single-group upgrade.
        down = self._choice_from_segments(self.critical)
        deficit = self.cap - self._removed_of(down)
        cur = self.starts + down
        q = self._first_at_least(self.flat_r[cur] + deficit)
        ok = q < self.sizes
        if ok.any():
            cost = np.where(ok, self.flat_e[self.starts + np.minimum(q, self.sizes - 1)] - self.flat_e[cur], np.inf)
            g = int(np.argmin(cost))
            down = down.copy()
            down[g] = q[g]
            cands.append(down)
        cands = [self._reduce_slack(c) for c in cands]
        errs = [self._error_of(c) for c in cands]
        return cands[int(np.argmin(errs))]

    def to_original(self, pos: np.ndarray) -> np.ndarray:
        return self.flat_idx[self.starts + pos].astype(np.int64)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def lp_lower_bound(removed: Sequence[np.ndarray], error: Sequence[np.ndarray], required_removed: int) -> float:
    """LP-relaxation lower bound of the MCKP (raises InfeasibleBudgetError if infeasible)."""
    rs, es = _validate(removed, error)
    _check_feasible(rs, int(required_removed))
    return _Prepared.build(rs, es, int(required_removed)).lower_bound


def _group_order(prep: _Prepared) -> np.ndarray:
    """DP processing order of the groups with more than one option: decreasing removed range."""
    multi = np.flatnonzero(prep.sizes > 1)
    rng = np.array([int(prep.pr[g][-1] - prep.pr[g][0]) for g in multi], dtype=np.int64)
    return multi[np.argsort(-rng, kind="stable")].astype(np.int64)


def _pareto_merge(acc_r, acc_e, acc_f, pending):
    """Non-dominated states of ``acc`` plus the ``pending`` chunks, sorted by removed ascending.

    A state is kept when every state removing at least as much has a strictly larger error.
    """
    cr = np.concatenate([acc_r] + [p[0] for p in pending])
    ce = np.concatenate([acc_e] + [p[1] for p in pending])
    cf = np.concatenate([acc_f] + [p[2] for p in pending])
    if cr.size <= 1:
        return cr, ce, cf
    po = np.lexsort((ce, -cr))  # removed descending, error ascending
    ce_s = ce[po]
    keep = np.empty(po.size, dtype=bool)
    keep[0] = True
    keep[1:] = ce_s[1:] < np.minimum.accumulate(ce_s)[:-1]
    sel = po[keep][::-1]
    return cr[sel], ce[sel], cf[sel]


def _check_limit(frontier: int, stored: int, k: int, L: int, max_states: int) -> None:
    if stored > max_states:
        raise FrontierLimitError(
            f"exact MCKP DP needs more than max_states={max_states} stored states (frontier of "
            f"{frontier} states at group {k + 1}/{L}). This happens when errors are (almost) exactly "
            "proportional to the removed counts, which turns the problem into subset-sum; raise "
            "max_states if the memory is available (about 8 bytes per stored state)."
        )


def _dp(prep: _Prepared, thresh: float, max_states: int) -> "Tuple[np.ndarray, List[int]] | None":
    """Pareto-frontier DP pruned at ``thresh``.

    Returns the staircase position per group of a minimum-error solution among
    those with error <= thresh, or None when no such solution exists.
    """
    cap = prep.cap
    # Groups with a single option are fixed; the DP runs over the others only.
    order = _group_order(prep)
    L = order.size
    rank = np.full(prep.n_groups, -1, dtype=np.int64)
    rank[order] = np.arange(L)
    fixed = prep.sizes == 1

    # Suffix LP bound data: segments sorted by slope, with the DP rank of their group.
    so = prep.seg_order
    s_dr = prep.seg_dr[so]
    s_de = prep.seg_de[so]
    s_rank = rank[prep.seg_group[so]] if so.size else np.zeros(0, np.int64)
    suf_base_r = np.zeros(L + 1, dtype=np.int64)
    suf_base_e = np.zeros(L + 1, dtype=np.float64)
    suf_base_r[:L] = np.cumsum(prep.base_r[order][::-1])[::-1]
    suf_base_e[:L] = np.cumsum(prep.base_e[order][::-1])[::-1]

    fr = np.array([min(int(prep.base_r[fixed].sum()), cap)], dtype=np.int64)
    fe = np.array([float(prep.base_e[fixed].sum())], dtype=np.float64)
    if L == 0 and (fr[0] < cap or fe[0] > thresh):
        return None
    history: List[np.ndarray] = []  # per step: flat index (parent * m + option) of each state
    sizes: List[int] = []
    stored = 0
    warned = False
    for k in range(L):
        g = int(order[k])
        pr, pe = prep.pr[g], prep.pe[g]
        m = pr.size
        # LP bound of the groups after k as a function of the missing amount d.
        mask = s_rank > k
        x = np.concatenate(([0], np.cumsum(s_dr[mask]))) + suf_base_r[k + 1]
        y = np.concatenate(([0.0], np.cumsum(s_de[mask]))) + suf_base_e[k + 1]
        d_max = int(x[-1])
        xf = x.astype(np.float64)

        rows = max(1, _CANDIDATE_CHUNK // m)
        acc_r = np.zeros(0, np.int64)
        acc_e = np.zeros(0, np.float64)
        acc_f = np.zeros(0, np.int64)
        pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        n_pending = 0
        for s in range(0, fr.size, rows):
            cr = fr[s : s + rows, None] + pr[None, :]
            np.minimum(cr, cap, out=cr)
            ce = fe[s : s + rows, None] + pe[None, :]
            d = cap - cr
            ok = d <= d_max
            ok &= ce + np.interp(d.astype(np.float64), xf, y) <= thresh
            flat = np.flatnonzero(ok.ravel())
            pending.append((cr.ravel()[flat], ce.ravel()[flat], flat + s * m))
            n_pending += flat.size
            if n_pending > 4 * _CANDIDATE_CHUNK:  # keep memory bounded: compress as we go
                acc_r, acc_e, acc_f = _pareto_merge(acc_r, acc_e, acc_f, pending)
                pending, n_pending = [], 0
                _check_limit(acc_r.size, stored + acc_r.size, k, L, max_states)
        fr, fe, cf = _pareto_merge(acc_r, acc_e, acc_f, pending)
        if fr.size == 0:
            logger.debug("MCKP DP at threshold %.9g: all states pruned at group %d/%d", thresh, k + 1, L)
            return None
        stored += fr.size
        _check_limit(fr.size, stored, k, L, max_states)
        history.append(cf)
        sizes.append(int(fr.size))
        if not warned and fr.size > _FRONTIER_WARN:
            warned = True
            logger.warning(
                "MCKP frontier has %d states at group %d/%d (solve stays exact; %d states stored)",
                fr.size, k + 1, L, stored,
            )

    pos = np.zeros(prep.n_groups, dtype=np.int64)
    if L:
        # The last step only keeps states meeting the budget (missing amount <= 0).
        j = int(np.argmin(fe))
        for k in range(L - 1, -1, -1):
            g = int(order[k])
            m = prep.pr[g].size
            f = int(history[k][j])
            pos[g] = f % m
            j = f // m
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "MCKP DP at threshold %.9g: staircase sizes mean %.2f, %d free groups, frontier max %d, total %d",
            thresh, float(prep.sizes.mean()) if prep.n_groups else 0.0, L,
            max(sizes, default=0), sum(sizes),
        )
    return pos, sizes


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
    rs, es = _validate(removed, error)
    _check_feasible(rs, required)
    L = len(rs)
    full = _Prepared.build(rs, es, required)
    lb = full.lower_bound
    inc_pos = full.incumbent()
    inc_choice = full.to_original(inc_pos)
    ub = full._error_of(inc_pos)
    tol = _REL_TOL * max(abs(ub), abs(lb)) + 1e-12 * full.err_scale + 1e-300

    # Reduced costs w.r.t. the LP multiplier lam: every solution has
    # error >= LB + sum_l rc_l(option_l), so a solution with error <= T only
    # uses options with rc <= T - LB.
    lam = float(full.seg_slope[full.seg_order[full.critical]]) if full.critical >= 0 else 0.0
    v = full.flat_e - lam * full.flat_r.astype(np.float64)
    rc = v - np.repeat(np.minimum.reduceat(v, full.starts), full.sizes) if L else v

    # Threshold deepening: a DP pruned at T that finds any solution finds the
    # optimum (which then is <= T); the last threshold is the incumbent, which
    # always succeeds.
    gap = ub - lb
    thresholds = [lb + f * gap for f in _DEEPEN if f * gap > tol] + [ub]
    choice = inc_choice
    sizes: List[int] = []
    for t in thresholds:
        thresh = t + tol
        sub = full.subset(rc <= thresh - lb + tol)
        if sub.max_removed() < full.cap:
            continue
        res = _dp(sub, thresh, int(max_states))
        if res is None:
            continue
        pos, sizes = res
        choice = sub.to_original(pos)
        break
    else:
        raise RuntimeError(
            "MCKP dynamic programme found no solution at the incumbent threshold; this indicates "
            f"a numerical problem (incumbent={ub!r}, lower bound={lb!r})"
        )

    total_removed = int(sum(int(rs[g][c]) for g, c in enumerate(choice)))
    total_error = float(sum(float(es[g][c]) for g, c in enumerate(choice)))
    if total_error > ub:  # only possible through rounding; never return worse than the incumbent
        choice, total_error = inc_choice, ub
        total_removed = int(sum(int(rs[g][c]) for g, c in enumerate(choice)))
    if total_removed < required:
        raise RuntimeError("internal error: MCKP solution violates the budget")
    logger.debug(
        "MCKP: %d groups, LB %.9g, incumbent %.9g, optimum %.9g, frontier max %d",
        L, lb, ub, total_error, max(sizes, default=0),
    )
    return KnapsackSolution(
        choice=choice,
        total_error=total_error,
        total_removed=total_removed,
        required_removed=required,
        lower_bound=float(lb),
        frontier_max=max(sizes, default=0),
        frontier_total=sum(sizes),
    )


def brute_force_mckp(
    removed: Sequence[np.ndarray], error: Sequence[np.ndarray], required_removed: int
) -> KnapsackSolution:
    """Exhaustive search over ``itertools.product`` (tests only; small instances)."""
    required = int(required_removed)
    rs, es = _validate(removed, error)
    _check_feasible(rs, required)
    best = None
    for combo in itertools.product(*[range(r.size) for r in rs]):
        tot_r = sum(int(rs[g][c]) for g, c in enumerate(combo))
        if tot_r < required:
            continue
        tot_e = float(sum(float(es[g][c]) for g, c in enumerate(combo)))
        if best is None or tot_e < best[0]:
            best = (tot_e, tot_r, combo)
    assert best is not None  # feasibility was checked
    lb = _Prepared.build(rs, es, required).lower_bound
    return KnapsackSolution(
        choice=np.asarray(best[2], dtype=np.int64),
        total_error=best[0],
        total_removed=best[1],
        required_removed=required,
        lower_bound=float(lb),
    )
