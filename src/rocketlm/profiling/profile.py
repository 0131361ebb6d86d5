"""Profile the candidates of the grid for one layer: sizes and both errors.

One whitening and one basis per layer (:func:`layer_basis`), then every (removed ratio, ks)
candidate reuses them. Candidates whose dictionary would exceed the layer's rank
(``k > min(d_in, d_out)``) or that keep no coefficient (``s == 0``) are not valid and skipped.

The allocation only needs, per removed ratio, the ks of smallest cost (``allocation.plan.layer_options``).
``ks_search="auto"`` therefore evaluates, per removed ratio, only the candidates that a descent over ks
visits for the run's cost (see :func:`search_ks` and :func:`run_ks_search`); ``"exhaustive"`` evaluates every
candidate (what studies of the candidates themselves, and the flops budget's Pareto fronts, want).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from rocketlm.allocation.costs import available_costs, get_cost, ks_search_cost
from rocketlm.config import GridConfig, RocketConfig
from rocketlm.factorization.sparse_dictionary import (ProductState, candidate_shape, factorize_next, kept_bytes,
                                                      kept_values, layer_basis)

# Lookahead of the ks descent, in units of ks: the error over a fine ks grid is a smooth bowl with
# wiggles of a few grid steps (the floor() in k and s), so the descent looks this far past a rise. On
# SmolLM2-135M's full grid (ks step 0.1) a lookahead of 0.2 missed a minimum 3 steps past a wiggle
# (gate_proj of block 3 at removed 0.70: 0.41341 at ks 2.6 against 0.41355 at 2.3); 0.3 finds every row's
# minimum of the 210 layers (bench/bench_profiling.py --compare).
KS_LOOKAHEAD = 0.3
# ...and at least this many grid steps: on the reference grid (ks step 0.5) one step missed the best ks of 7 of
# 5880 (cost, layer, removed ratio) of SmolLM2-135M, all k_proj/v_proj rows where the error rises for one step.
KS_LOOKAHEAD_MIN_STEPS = 2
# Where the errors a descent saw are not unimodal in ks (wiggles), the ks within this many lookaheads of the minima
# found are evaluated, and the descent goes on from the best of them; earlier the whole row was. On SmolLM2-135M's
# full grid the wiggles sent 86 of 196 rows (blocks 3 and 20, output error) to a whole-row scan.
KS_WIGGLE_REACH = 2
# A ks the search reaches without products of its own starts from a copy of the held products nearest in k
# (:class:`ProductState`, updated sparsely) instead of dense ones, which cost the most on wide layers (a third of
# a 2048 x 8192 layer's profile). False: dense, as before 2026-12-07.
KS_BORROW_STATES = True


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
    ks_search: str = "exhaustive"  # "auto": only the candidates the ks descent visited are stored
    search_costs: list[str] | None = None  # ("auto") the costs whose best ks the descent found; None in stores
    # written before the search recorded them, when it searched every profiling-time cost

    def serves(self, cost: str, budget_count: str = "values") -> bool:
        """Whether the candidates stored hold the best ks per removed ratio under ``cost`` (and, for a flops
        budget, every candidate)."""
        if self.ks_search == "exhaustive":
            return True
        if budget_count == "flops":
            return False
        searched = self.search_costs if self.search_costs is not None else profiling_time_costs()
        return ks_search_cost(cost) in searched

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


def run_ks_search(config: RocketConfig) -> tuple[str, tuple[str, ...]]:
    """``(mode, costs searched)`` of a run's profiling: ``"auto"`` searches the best ks of the one cost that
    ranks the run's cost's candidates (:func:`rocketlm.allocation.costs.ks_search_cost`: ``fisher`` searches
    ``output``). It profiles exhaustively instead under a flops budget, which needs every candidate (its Pareto
    fronts), and on a grid too short for the search to skip anything (at most ``2 x lookahead + 1`` ks values,
    such as the reference's 5: the descent sees nearly the whole row, and one exhaustive profile serves every
    cost)."""
    if (config.ks_search == "exhaustive" or config.budget_count == "flops"
            or len(config.grid.ks) <= 2 * ks_lookahead(config.grid) + 1):
        return "exhaustive", ()
    return config.ks_search, (ks_search_cost(config.cost),)


def profile_layer(name: str, W: torch.Tensor, S: torch.Tensor, grid: GridConfig, *, group: str,
                  value_bytes: int, ridge_rel: float, importance_power: float,
                  dtype: torch.dtype, ks_search: str = "auto",
                  search_costs: Sequence[str] | None = None) -> LayerProfile:
    """The candidates of one layer (all of them, or those the ks search visits for ``search_costs``: cost
    names, default every registered cost that scores candidates at profiling time). ``W``: d_in x d_out;
    ``S``: upper whitening factor (float64).

    Candidates are factored along each ks by increasing removed ratio (:func:`factorize_next`: consecutive
    candidates of one ks share all but a few percent of their coefficients); equal ``(k, s)`` are factored
    once."""
    d_in, d_out = W.shape
    basis = layer_basis(W, S, importance_power=importance_power, dtype=dtype)
    if ks_search != "exhaustive":
        search_costs = list(search_costs) if search_costs is not None else profiling_time_costs()
    profile = LayerProfile(name=name, d_in=d_in, d_out=d_out, dense_values=d_in * d_out,
                           dense_bytes=d_in * d_out * value_bytes, group=group, candidates=[], ks_search=ks_search,
                           search_costs=None if ks_search == "exhaustive" else search_costs)
    evaluate = _evaluator(basis, d_in, d_out, value_bytes, ridge_rel,
                          borrow=ks_search != "exhaustive" and KS_BORROW_STATES)
    shapes = valid_shapes(d_in, d_out, grid)
    if ks_search == "exhaustive":
        by_ks = {shape: evaluate(shape) for ks in grid.ks for shape in shapes if shape[1] == ks}
        profile.candidates = [by_ks[shape] for shape in shapes]
    else:
        rows = [[shape for shape in shapes if shape[0] == removed] for removed in grid.removed_ratios]
        profile.candidates = search_ks([row for row in rows if row], evaluate, searchable_costs(profile, search_costs),
                                       ks_lookahead(grid), free=lambda shape: shape[3] >= shape[2],
                                       reach=KS_WIGGLE_REACH)
    return profile


def _evaluator(basis, d_in: int, d_out: int, value_bytes: int, ridge_rel: float,
               borrow: bool = False) -> Callable[[tuple], Candidate]:
    """``(removed, ks, k, s) -> Candidate``, keeping one :class:`ProductState` per ks (the last removed ratio
    evaluated there) and the errors of every ``(k, s)`` already factored. States unused for two removed
    ratios are dropped (memory). With ``borrow``, a ks without a state starts from a copy of the held state
    nearest in ``k`` (the most recent on a tie) instead of dense products: the ks search visits ks in no fixed
    order."""
    errors: dict[tuple[int, int], tuple[float, float]] = {}
    states: dict[float, tuple[float, ProductState | None]] = {}

    def evaluate(shape: tuple[float, float, int, int]) -> Candidate:
        removed, ks, k, s = shape
        if (k, s) not in errors:
            state = states.get(ks, (None, None))[1]
            if state is None and borrow:  # a ks new to the search starts from the held products nearest in k
                held = [(abs(st.k - k), -r, st) for r, st in states.values() if st is not None]
                state = min(held, key=lambda h: h[:2])[2].copy() if held else None
            fact, state = factorize_next(basis, k, s, state, ridge_rel)
            states[ks] = (removed, state)
            for other in [o for o, (r, _) in states.items() if r < removed - 0.15]:
                del states[other]
            errors[(k, s)] = (fact.error_weight, fact.error_output)
        return Candidate(removed_ratio=removed, ks=ks, k=k, s=s, kept_values=kept_values(d_in, d_out, k, s),
                         kept_bytes=kept_bytes(d_in, d_out, k, s, value_bytes),
                         error_weight=errors[(k, s)][0], error_output=errors[(k, s)][1])
    return evaluate


def profiling_time_costs() -> list[str]:
    """The registered costs that score a candidate from its errors alone, in registry order. A cost that needs
    per-layer data measured later (``fisher``: a positive per-layer multiple of the squared output error, so its
    best ks is the output cost's) cannot score at profiling time."""
    blank = LayerProfile(name="", d_in=1, d_out=1, dense_values=1, dense_bytes=1, group="", candidates=[])
    probe = Candidate(removed_ratio=0.0, ks=1.0, k=1, s=1, kept_values=0, kept_bytes=0, error_weight=0.0,
                      error_output=0.0)
    names = []
    for name in available_costs():
        try:
            get_cost(name).fn(blank, probe)
        except (ValueError, AttributeError, TypeError):
            continue
        names.append(name)
    return names


def searchable_costs(profile: LayerProfile, names: Sequence[str] | None = None) -> list[Callable[[Candidate], float]]:
    """The costs ``names`` (default: :func:`profiling_time_costs`) as functions of ``profile``'s candidates."""
    return [lambda c, fn=get_cost(name).fn: fn(profile, c)
            for name in (profiling_time_costs() if names is None else names)]


def ks_lookahead(grid: GridConfig) -> int:
    """Grid steps the descent looks past a rise: :data:`KS_LOOKAHEAD` in ks units, at least
    :data:`KS_LOOKAHEAD_MIN_STEPS`."""
    steps = sorted(b - a for a, b in zip(grid.ks, grid.ks[1:]))
    return max(KS_LOOKAHEAD_MIN_STEPS, math.ceil(KS_LOOKAHEAD / steps[len(steps) // 2] - 1e-9)) if steps else 1


def search_ks(rows: Sequence[Sequence[tuple]], evaluate: Callable[[tuple], Candidate],
              costs: Sequence[Callable[[Candidate], float]], lookahead: int,
              free: Callable[[tuple], bool] = lambda shape: False,
              reach: int | None = None) -> list[Candidate]:
    """Per row (one removed ratio, its ``(removed, ks, k, s)`` shapes by increasing ks), the evaluated
    candidates: for every
    cost, a descent over ks (:func:`descend`) from the ks that was best at the previous removed ratio;
    ``free`` candidates (closed form) are always evaluated. Where the evaluated errors of a cost are not
    unimodal in ks (the assumption that makes a local minimum the global one), every ks within ``reach``
    lookaheads of a minimum found is evaluated (the whole row with ``reach=None``; :func:`profile_layer` passes
    :data:`KS_WIGGLE_REACH`), and the descent goes on from the best of them.
    Rows are visited in order; the result lists the evaluated candidates row by row, by increasing ks."""
    previous: list[float | None] = [None] * len(costs)
    result: list[Candidate] = []
    for row in rows:
        seen = {i: evaluate(item) for i, item in enumerate(row) if free(item)}

        def at(i: int) -> Candidate:
            if i not in seen:
                seen[i] = evaluate(row[i])
            return seen[i]

        found = []
        for c, cost in enumerate(costs):
            start = len(row) // 2 if previous[c] is None else min(
                range(len(row)), key=lambda i: abs(row[i][1] - previous[c]))
            found.append(descend(lambda i: cost(at(i)), len(row), start, lookahead))
        if not all(unimodal([cost(seen[i]) for i in sorted(seen)]) for cost in costs):
            for i in range(len(row)):
                if reach is None or any(abs(i - j) <= reach * lookahead for j in found):
                    at(i)
            found = [descend(lambda i: cost(at(i)), len(row), min(seen, key=lambda i: (cost(seen[i]), i)), lookahead)
                     for cost in costs]
        previous = [row[i][1] for i in found]
        result.extend(seen[i] for i in sorted(seen))
    return result


def descend(value: Callable[[int], float], n: int, start: int, lookahead: int) -> int:
    """Index of a local minimum of ``value`` over ``0..n-1`` reached from ``start``: move to the nearest
    point within ``lookahead`` that is lower (to the left: lower or equal, so ties go to smaller ks),
    until none is. Evaluates ``value`` only where it looks."""
    i = start
    while True:
        lower = next((j for j in range(i - 1, max(-1, i - 1 - lookahead), -1) if value(j) <= value(i)), None)
        if lower is None:
            lower = next((j for j in range(i + 1, min(n, i + 1 + lookahead)) if value(j) < value(i)), None)
        if lower is None:
            return i
        i = lower


def unimodal(values: Sequence[float]) -> bool:
    """Non-increasing up to the (first) minimum, non-decreasing after it."""
    best = min(range(len(values)), key=lambda i: (values[i], i)) if values else 0
    return (all(a >= b for a, b in zip(values[:best], values[1:best + 1]))
            and all(a <= b for a, b in zip(values[best:], values[best + 1:])))
