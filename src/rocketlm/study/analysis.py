"""Why the costs agree or not (the ActCost paper's section 3.3), from profiles and allocations.

* :func:`error_correlations`: per layer, Spearman correlation between the weight-space and
  the output-space error across that layer's candidates.
* :func:`allocation_difference`: the layers two allocations treat differently.
* :func:`best_ks_disagreement`: share of (layer, removed ratio) pairs whose best ks differs
  between two costs.
* :func:`allocation_sweep`: allocation only (no compression, no evaluation) over many target
  ratios, and the divergence between every pair of costs at each ratio.

Everything returns plain JSON-ready dicts and lists.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from rocketlm.allocation.plan import Allocation, InfeasibleAllocationError, LayerChoice, allocate, layer_options
from rocketlm.profiling.profile import LayerProfile
from rocketlm.study.stats import spearman

log = logging.getLogger(__name__)

HIGH_CORRELATION = 0.99  # the paper's threshold ("exceeds 0.99 for nearly all layers")
_BLOCK = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def layer_position(name: str) -> tuple[int | None, str]:
    """(decoder block index, projection name) from a module name, e.g.
    ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``; ``(None, name)`` without an index."""
    match = _BLOCK.search(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def cost_pairs(costs: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of costs, in the order given (``weight`` first when it is first)."""
    return list(itertools.combinations(costs, 2))


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


# --------------------------------------------------------------------------- error correlation

def error_correlations(profiles: Sequence[LayerProfile]) -> list[dict]:
    """Per layer: Spearman(weight error, output error) over its candidates."""
    out = []
    for p in profiles:
        rho = spearman([c.error_weight for c in p.candidates], [c.error_output for c in p.candidates])
        out.append({"name": p.name, "spearman": None if math.isnan(rho) else rho, "n_candidates": len(p.candidates)})
    return out


def correlation_summary(rows: Sequence[dict], threshold: float = HIGH_CORRELATION) -> dict:
    """Distribution of the per-layer correlations: min / median / mean / max and the share above ``threshold``."""
    rhos = np.array([r["spearman"] for r in rows if r["spearman"] is not None], dtype=np.float64)
    if rhos.size == 0:
        return {"n_layers": len(rows), "n_defined": 0, "threshold": threshold}
    return {"n_layers": len(rows), "n_defined": int(rhos.size), "threshold": threshold,
            "min": float(rhos.min()), "median": float(np.median(rhos)), "mean": float(rhos.mean()),
            "max": float(rhos.max()), "share_above": float((rhos > threshold).mean()),
            "n_above": int((rhos > threshold).sum()),
            "quantiles": {q: float(np.quantile(rhos, float(q))) for q in ("0.05", "0.25", "0.75", "0.95")}}


# --------------------------------------------------------------------------- allocation divergence

def kept_fraction(choice: LayerChoice) -> float:
    return choice.kept_values / choice.dense_values


def _describe(choice: LayerChoice) -> dict:
    return {"dense": choice.dense, "removed_ratio": choice.removed_ratio, "ks": choice.ks,
            "kept_fraction": kept_fraction(choice)}


def _same_candidate(a: LayerChoice, b: LayerChoice) -> bool:
    return a.dense == b.dense and (a.dense or (a.removed_ratio == b.removed_ratio and a.ks == b.ks))


def allocation_difference(a: Allocation, b: Allocation) -> dict:
    """Layers allocated differently by ``a`` and ``b`` (same profiles, two costs or two ratios).

    ``n_differ``: another candidate (removed ratio or ks or dense); ``n_differ_ratio``: another
    removed ratio (or dense vs compressed), i.e. another size; ``mean_abs_kept_diff``: mean over
    layers of |kept fraction a - kept fraction b|.
    """
    by_name = {c.name: c for c in b.choices}
    missing = [c.name for c in a.choices if c.name not in by_name]
    if missing or len(by_name) != len(a.choices):
        raise ValueError(f"allocation_difference: the allocations cover different layers (e.g. {missing[:3]})")
    layers, n_ratio, kept_diff = [], 0, []
    for ca in a.choices:
        cb = by_name[ca.name]
        kept_diff.append(abs(kept_fraction(ca) - kept_fraction(cb)))
        if _same_candidate(ca, cb):
            continue
        same_size = ca.dense == cb.dense and ca.removed_ratio == cb.removed_ratio
        n_ratio += not same_size
        layers.append({"name": ca.name, "a": _describe(ca), "b": _describe(cb), "same_ratio": same_size})
    n = len(a.choices)
    return {"cost_a": a.cost, "cost_b": b.cost, "n_layers": n, "n_differ": len(layers),
            "share_differ": len(layers) / n if n else 0.0, "n_differ_ratio": n_ratio,
            "mean_abs_kept_diff": float(np.mean(kept_diff)) if kept_diff else 0.0, "layers": layers}


def best_ks_disagreement(profiles: Sequence[LayerProfile], cost_a: str, cost_b: str) -> dict:
    """Share of (layer, grid removed ratio) pairs whose best ks differs between ``cost_a`` and ``cost_b``.

    Only ratios with more than one valid ks are counted in ``n_pairs_with_choice`` (with a single
    candidate both costs must agree); ``share`` is over all pairs, as in the paper.
    """
    n_pairs = n_differ = n_choice = n_differ_choice = 0
    for p in profiles:
        best_a = {c.removed_ratio: c.ks for c in layer_options(p, cost_a)}
        best_b = {c.removed_ratio: c.ks for c in layer_options(p, cost_b)}
        n_ks = {}
        for c in p.candidates:
            n_ks[c.removed_ratio] = n_ks.get(c.removed_ratio, 0) + 1
        for ratio in best_a.keys() & best_b.keys():
            differ = best_a[ratio] != best_b[ratio]
            n_pairs += 1
            n_differ += differ
            if n_ks[ratio] > 1:
                n_choice += 1
                n_differ_choice += differ
    return {"cost_a": cost_a, "cost_b": cost_b, "n_pairs": n_pairs, "n_differ": n_differ,
            "share": n_differ / n_pairs if n_pairs else 0.0, "n_pairs_with_choice": n_choice,
            "share_with_choice": n_differ_choice / n_choice if n_choice else 0.0}


def allocation_summary(alloc: Allocation) -> dict:
    """The compact part of an allocation the study keeps per sweep point."""
    return {"achieved_removed_ratio": alloc.achieved_removed_ratio, "total_cost": alloc.total_cost,
            "solve_seconds": alloc.solve_seconds, "n_dense": sum(c.dense for c in alloc.choices),
            "kept_fraction": [kept_fraction(c) for c in alloc.choices]}


def allocation_sweep(profiles: Sequence[LayerProfile], ratios: Sequence[float], costs: Sequence[str], *,
                     budget_count: str = "values", alpha: float | str | None = None) -> list[dict]:
    """Allocate every cost at every ratio (allocation only) and compare every pair of costs.

    A ratio the grid cannot reach is recorded as ``{"infeasible": message}`` for that cost.
    """
    points = []
    for ratio in ratios:
        allocs, point = {}, {"ratio": float(ratio), "costs": {}, "pairs": {}}
        for cost in costs:
            try:
                allocs[cost] = allocate(list(profiles), float(ratio), cost, budget_count, alpha)
            except InfeasibleAllocationError as exc:
                point["costs"][cost] = {"infeasible": str(exc)}
                continue
            point["costs"][cost] = allocation_summary(allocs[cost])
        for a, b in cost_pairs(costs):
            if a in allocs and b in allocs:
                diff = allocation_difference(allocs[a], allocs[b])
                point["pairs"][pair_key(a, b)] = {k: v for k, v in diff.items() if k != "layers"}
        points.append(point)
    log.info("allocation sweep: %d ratios x %d costs", len(ratios), len(costs))
    return points


def divergence_analysis(profiles: Sequence[LayerProfile], allocations: dict[float, dict[str, Allocation]],
                        costs: Sequence[str]) -> dict:
    """Everything of section 3 for one seed: correlations, best-ks disagreement, per-ratio allocation differences.

    ``allocations``: ratio -> cost -> the allocation the study used.
    """
    correlations = error_correlations(profiles)
    by_ratio = {}
    for ratio, per_cost in sorted(allocations.items()):
        by_ratio[f"{ratio:g}"] = {pair_key(a, b): allocation_difference(per_cost[a], per_cost[b])
                                  for a, b in cost_pairs(costs) if a in per_cost and b in per_cost}
    return {
        "correlations": correlations,
        "correlation_summary": correlation_summary(correlations),
        "best_ks": {pair_key(a, b): best_ks_disagreement(profiles, a, b) for a, b in cost_pairs(costs)},
        "allocation_differences": by_ratio,
        "n_layers": len(profiles),
        "n_candidates": sum(len(p.candidates) for p in profiles),
    }
