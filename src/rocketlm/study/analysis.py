"""Why the costs agree or not (the ActCost paper's section 3.3), from profiles and allocations.

* :func:`error_correlations`: per layer, Spearman correlation between the weight-space and
  the output-space error across that layer's candidates.
* :func:`allocation_difference`: the layers two allocations treat differently.
* :func:`best_ks_disagreement`: share of (layer, removed ratio) pairs whose best ks differs
  between two costs.
* :func:`allocation_sweep`: allocation only (no compression, no evaluation) over many target
  ratios, and the divergence between every pair of costs at each ratio.

Everything returns the typed records below; ``to_json()`` gives their ``study.json`` form.
A pair of costs is a :data:`CostPair` ``(a, b)``; in JSON it is the key ``"a|b"`` (:func:`pair_key`).
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from rocketlm.allocation.plan import Allocation, InfeasibleAllocationError, LayerChoice, allocate, layer_options
from rocketlm.profiling.profile import LayerProfile
from rocketlm.study.stats import spearman

log = logging.getLogger(__name__)

HIGH_CORRELATION = 0.99  # the paper's threshold ("exceeds 0.99 for nearly all layers")
_BLOCK = re.compile(r"(?:^|\.)(\d+)\.(.+)$")

CostPair = tuple[str, str]


def layer_position(name: str) -> tuple[int | None, str]:
    """(decoder block index, projection name) from a module name, e.g.
    ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``; ``(None, name)`` without an index."""
    match = _BLOCK.search(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def cost_pairs(costs: Sequence[str]) -> list[CostPair]:
    """Every unordered pair of costs, in the order given (``weight`` first when it is first)."""
    return list(itertools.combinations(costs, 2))


def pair_key(pair: CostPair) -> str:
    """The JSON key of a pair of costs: ``"a|b"``."""
    return "|".join(pair)


def pair_label(pair: CostPair) -> str:
    """The pair as the report names it: ``"a vs b"``."""
    return " vs ".join(pair)


def pairs_json(by_pair: Mapping[CostPair, Any], **kwargs) -> dict[str, dict]:
    """``{pair: record}`` -> ``{"a|b": record.to_json(**kwargs)}``."""
    return {pair_key(pair): record.to_json(**kwargs) for pair, record in by_pair.items()}


# --------------------------------------------------------------------------- error correlation

@dataclass(frozen=True)
class LayerCorrelation:
    """Spearman(weight error, output error) over one layer's candidates (None: undefined)."""

    name: str
    spearman: float | None
    n_candidates: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CorrelationSummary:
    """Distribution of the per-layer correlations; the statistics are None when no layer has one."""

    n_layers: int
    n_defined: int
    threshold: float
    min: float | None = None
    median: float | None = None
    mean: float | None = None
    max: float | None = None
    share_above: float | None = None  # share of the defined layers above ``threshold``
    n_above: int = 0
    quantiles: dict[str, float] = field(default_factory=dict)  # "0.05" -> value

    def to_json(self) -> dict:
        return asdict(self)


def error_correlations(profiles: Sequence[LayerProfile]) -> list[LayerCorrelation]:
    """Per layer: Spearman(weight error, output error) over its candidates."""
    out = []
    for p in profiles:
        rho = spearman([c.error_weight for c in p.candidates], [c.error_output for c in p.candidates])
        out.append(LayerCorrelation(p.name, None if math.isnan(rho) else rho, len(p.candidates)))
    return out


def correlation_summary(rows: Sequence[LayerCorrelation], threshold: float = HIGH_CORRELATION) -> CorrelationSummary:
    """Distribution of the per-layer correlations: min / median / mean / max and the share above ``threshold``."""
    rhos = np.array([r.spearman for r in rows if r.spearman is not None], dtype=np.float64)
    if rhos.size == 0:
        return CorrelationSummary(n_layers=len(rows), n_defined=0, threshold=threshold)
    return CorrelationSummary(
        n_layers=len(rows), n_defined=int(rhos.size), threshold=threshold, min=float(rhos.min()),
        median=float(np.median(rhos)), mean=float(rhos.mean()), max=float(rhos.max()),
        share_above=float((rhos > threshold).mean()), n_above=int((rhos > threshold).sum()),
        quantiles={q: float(np.quantile(rhos, float(q))) for q in ("0.05", "0.25", "0.75", "0.95")})


# --------------------------------------------------------------------------- allocation divergence

def kept_fraction(choice: LayerChoice) -> float:
    return choice.kept_values / choice.dense_values


@dataclass(frozen=True)
class ChoiceSummary:
    """What an allocation did with one layer."""

    dense: bool
    removed_ratio: float
    ks: float | None
    kept_fraction: float

    @classmethod
    def of(cls, choice: LayerChoice) -> ChoiceSummary:
        return cls(choice.dense, choice.removed_ratio, choice.ks, kept_fraction(choice))

    def describe(self) -> str:
        return "dense" if self.dense else f"r{self.removed_ratio:g}/ks{self.ks:g}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerDifference:
    """A layer two allocations treat differently; ``same_ratio``: the same size, another ks."""

    name: str
    a: ChoiceSummary
    b: ChoiceSummary
    same_ratio: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AllocationDifference:
    """How two allocations of the same layers differ (see :func:`allocation_difference`)."""

    cost_a: str
    cost_b: str
    n_layers: int
    n_differ: int
    share_differ: float
    n_differ_ratio: int
    mean_abs_kept_diff: float
    layers: tuple[LayerDifference, ...] = ()

    def to_json(self, layers: bool = True) -> dict:
        data = asdict(self)
        if not layers:
            del data["layers"]
        return data


def _same_candidate(a: LayerChoice, b: LayerChoice) -> bool:
    return a.dense == b.dense and (a.dense or (a.removed_ratio == b.removed_ratio and a.ks == b.ks))


def allocation_difference(a: Allocation, b: Allocation) -> AllocationDifference:
    """Layers allocated differently by ``a`` and ``b`` (same profiles, two costs or two ratios).

    ``n_differ``: another candidate (removed ratio or ks or dense); ``n_differ_ratio``: another
    removed ratio (or dense vs compressed), i.e. another size; ``mean_abs_kept_diff``: mean over
    layers of |kept fraction a - kept fraction b|.
    """
    by_name = {c.name: c for c in b.choices}
    missing = [c.name for c in a.choices if c.name not in by_name]
    if missing or len(by_name) != len(a.choices):
        raise ValueError(f"allocation_difference: the allocations cover different layers (e.g. {missing[:3]})")
    layers, kept_diff = [], []
    for ca in a.choices:
        cb = by_name[ca.name]
        kept_diff.append(abs(kept_fraction(ca) - kept_fraction(cb)))
        if not _same_candidate(ca, cb):
            same_size = ca.dense == cb.dense and ca.removed_ratio == cb.removed_ratio
            layers.append(LayerDifference(ca.name, ChoiceSummary.of(ca), ChoiceSummary.of(cb), same_size))
    n = len(a.choices)
    return AllocationDifference(
        cost_a=a.cost, cost_b=b.cost, n_layers=n, n_differ=len(layers), share_differ=len(layers) / n if n else 0.0,
        n_differ_ratio=sum(not d.same_ratio for d in layers),
        mean_abs_kept_diff=float(np.mean(kept_diff)) if kept_diff else 0.0, layers=tuple(layers))


@dataclass(frozen=True)
class BestKsDisagreement:
    """(layer, grid removed ratio) pairs whose best ks differs between two costs."""

    cost_a: str
    cost_b: str
    n_pairs: int
    n_differ: int
    share: float  # over all pairs, as in the paper
    n_pairs_with_choice: int  # pairs with more than one valid ks
    share_with_choice: float

    def to_json(self) -> dict:
        return asdict(self)


def best_ks_disagreement(profiles: Sequence[LayerProfile], cost_a: str, cost_b: str) -> BestKsDisagreement:
    """Share of (layer, grid removed ratio) pairs whose best ks differs between ``cost_a`` and ``cost_b``.

    Only ratios with more than one valid ks are counted in ``n_pairs_with_choice`` (with a single
    candidate both costs must agree); ``share`` is over all pairs, as in the paper.
    """
    n_pairs = n_differ = n_choice = n_differ_choice = 0
    for p in profiles:
        best_a = {c.removed_ratio: c.ks for c in layer_options(p, cost_a)}
        best_b = {c.removed_ratio: c.ks for c in layer_options(p, cost_b)}
        n_ks: dict[float, int] = {}
        for c in p.candidates:
            n_ks[c.removed_ratio] = n_ks.get(c.removed_ratio, 0) + 1
        for ratio in best_a.keys() & best_b.keys():
            differ = best_a[ratio] != best_b[ratio]
            n_pairs += 1
            n_differ += differ
            if n_ks[ratio] > 1:
                n_choice += 1
                n_differ_choice += differ
    return BestKsDisagreement(cost_a, cost_b, n_pairs, n_differ, n_differ / n_pairs if n_pairs else 0.0,
                              n_choice, n_differ_choice / n_choice if n_choice else 0.0)


# --------------------------------------------------------------------------- allocation-only sweep

@dataclass(frozen=True)
class AllocationSummary:
    """The compact part of an allocation the study keeps per sweep point."""

    achieved_removed_ratio: float
    total_cost: float
    solve_seconds: float
    n_dense: int
    kept_fraction: tuple[float, ...]  # per layer, in model order

    @classmethod
    def of(cls, alloc: Allocation) -> AllocationSummary:
        return cls(alloc.achieved_removed_ratio, alloc.total_cost, alloc.solve_seconds,
                   sum(c.dense for c in alloc.choices), tuple(kept_fraction(c) for c in alloc.choices))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SweepPoint:
    """Every cost allocated at one target ratio; ``pairs`` hold the differences without the layer lists."""

    ratio: float
    costs: dict[str, AllocationSummary]  # the costs that reached the ratio
    infeasible: dict[str, str] = field(default_factory=dict)  # cost -> why the grid cannot reach the ratio
    pairs: dict[CostPair, AllocationDifference] = field(default_factory=dict)

    def to_json(self) -> dict:
        costs = {c: s.to_json() for c, s in self.costs.items()}
        costs.update({c: {"infeasible": why} for c, why in self.infeasible.items()})
        return {"ratio": self.ratio, "costs": costs, "pairs": pairs_json(self.pairs, layers=False)}


def _sweep_point(profiles: Sequence[LayerProfile], ratio: float, costs: Sequence[str], budget_count: str,
                 alpha: float | str | None) -> SweepPoint:
    allocs: dict[str, Allocation] = {}
    infeasible: dict[str, str] = {}
    for cost in costs:
        try:
            allocs[cost] = allocate(list(profiles), ratio, cost, budget_count, alpha)
        except InfeasibleAllocationError as exc:
            infeasible[cost] = str(exc)
    pairs = {(a, b): replace(allocation_difference(allocs[a], allocs[b]), layers=())
             for a, b in cost_pairs(costs) if a in allocs and b in allocs}
    return SweepPoint(ratio, {c: AllocationSummary.of(a) for c, a in allocs.items()}, infeasible, pairs)


def allocation_sweep(profiles: Sequence[LayerProfile], ratios: Sequence[float], costs: Sequence[str], *,
                     budget_count: str = "values", alpha: float | str | None = None) -> list[SweepPoint]:
    """Allocate every cost at every ratio (allocation only) and compare every pair of costs.

    A ratio the grid cannot reach is recorded in the point's ``infeasible`` for that cost.
    """
    points = [_sweep_point(profiles, float(ratio), costs, budget_count, alpha) for ratio in ratios]
    log.info("allocation sweep: %d ratios x %d costs", len(ratios), len(costs))
    return points


# --------------------------------------------------------------------------- one seed's analysis

@dataclass(frozen=True)
class SeedDivergence:
    """Everything of section 3 for one seed."""

    correlations: tuple[LayerCorrelation, ...]
    correlation_summary: CorrelationSummary
    best_ks: dict[CostPair, BestKsDisagreement]
    allocation_differences: dict[float, dict[CostPair, AllocationDifference]]  # removed ratio -> pair -> difference
    n_layers: int
    n_candidates: int

    def to_json(self) -> dict:
        return {"correlations": [c.to_json() for c in self.correlations],
                "correlation_summary": self.correlation_summary.to_json(),
                "best_ks": pairs_json(self.best_ks),
                "allocation_differences": {f"{r:g}": pairs_json(d) for r, d in self.allocation_differences.items()},
                "n_layers": self.n_layers, "n_candidates": self.n_candidates}


def divergence_analysis(profiles: Sequence[LayerProfile], allocations: dict[float, dict[str, Allocation]],
                        costs: Sequence[str]) -> SeedDivergence:
    """Correlations, best-ks disagreement and per-ratio allocation differences for one seed.

    ``allocations``: ratio -> cost -> the allocation the study used.
    """
    correlations = error_correlations(profiles)
    by_ratio = {ratio: {(a, b): allocation_difference(per_cost[a], per_cost[b])
                        for a, b in cost_pairs(costs) if a in per_cost and b in per_cost}
                for ratio, per_cost in sorted(allocations.items())}
    return SeedDivergence(
        correlations=tuple(correlations), correlation_summary=correlation_summary(correlations),
        best_ks={pair: best_ks_disagreement(profiles, *pair) for pair in cost_pairs(costs)},
        allocation_differences=by_ratio, n_layers=len(profiles),
        n_candidates=sum(len(p.candidates) for p in profiles))
