"""Allocation costs: a small registry of functions scoring a profiled candidate.

A cost maps (layer profile, candidate) to the non-negative number the knapsack sums. The
same cost also picks the best ``ks`` per (layer, removed ratio).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry needs no profiling code at run time (config.py imports it)
    from rocketlm.profiling.profile import Candidate, LayerProfile

CostFn = Callable[["LayerProfile", "Candidate"], float]


@dataclass(frozen=True)
class Cost:
    name: str
    fn: CostFn
    description: str
    # the cost whose best ks per (layer, removed ratio) is this one's too (a per-layer increasing function of
    # it), so the profiling's ks search serves both with one search; None: the cost itself
    same_best_ks_as: str | None = None


_REGISTRY: dict[str, Cost] = {}


def register_cost(name: str, description: str, same_best_ks_as: str | None = None):
    """Decorator: ``@register_cost("name", "what it measures")`` on a ``(profile, candidate) -> float``.
    ``same_best_ks_as``: a registered cost of which this one is a per-layer increasing function (its best ks
    per removed ratio is then the same; the ks search of profiling searches that cost instead)."""
    def decorate(fn: CostFn) -> CostFn:
        _REGISTRY[name] = Cost(name, fn, description, same_best_ks_as)
        return fn
    return decorate


def available_costs() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def ks_search_cost(name: str) -> str:
    """The cost the profiling's ks search looks for the best ks of, so that ``name``'s allocation gets its own
    best ks per (layer, removed ratio)."""
    return get_cost(name).same_best_ks_as or name


def get_cost(name: str) -> Cost:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown cost {name!r}; available: {', '.join(_REGISTRY)}") from None


@register_cost("weight", "ROCKET: relative weight-space error ||W - W_hat|| / ||W||")
def weight_cost(profile: LayerProfile, candidate: Candidate) -> float:
    return candidate.error_weight


@register_cost("output", "ROCKET-ActCost: relative output-space error ||XW - XW_hat|| / ||XW|| on the calibration data")
def output_cost(profile: LayerProfile, candidate: Candidate) -> float:
    return candidate.error_output


@register_cost("blend", "midpoint of the two: 0.5 x weight error + 0.5 x output error (aims between ROCKET's "
                        "perplexity and ActCost's accuracy, the trade-off the ActCost paper reports)")
def blend_cost(profile: LayerProfile, candidate: Candidate) -> float:
    return 0.5 * (candidate.error_weight + candidate.error_output)


SENSITIVITY_COSTS = ("fisher",)


def needs_sensitivity(cost: str) -> bool:
    """Whether ``cost`` reads per-layer sensitivities (``profile.sensitivity``, set by
    :func:`rocketlm.calibration.sensitivity.attach_sensitivities`)."""
    return cost in SENSITIVITY_COSTS


@register_cost("fisher", "predicted loss increase: sensitivity x (output error)^2, the sensitivity measured per layer "
                         "by a backward pass on calibration windows (empirical Fisher, no weight update)",
               same_best_ks_as="output")
def fisher_cost(profile: LayerProfile, candidate: Candidate) -> float:
    sensitivity = getattr(profile, "sensitivity", None)
    if sensitivity is None:
        raise ValueError(f"{profile.name}: the 'fisher' cost needs per-layer sensitivities; measure them with "
                         "rocketlm.calibration.sensitivity.cached_sensitivities and attach_sensitivities first")
    return sensitivity * candidate.error_output ** 2
