import itertools
import math

import pytest

from rocketlm.allocation.plan import InfeasibleAllocationError, allocate, candidate_choices, layer_options
from rocketlm.profiling.profile import Candidate, LayerProfile


def _profile(name, d_in, d_out, seed):
    import random
    rng = random.Random(seed)
    cands = []
    for removed in (0.1, 0.3, 0.5, 0.7):
        for ks in (1.0, 2.0, 3.0):
            kept = int((1 - removed) * d_in * d_out) - rng.randint(0, 50)
            e_w = removed ** 0.8 * (1 + 0.2 * rng.random()) * (1.2 if ks == 1.0 else 1.0)
            e_o = removed ** 1.2 * (1 + 0.2 * rng.random()) * (1.2 if ks == 3.0 else 1.0)
            cands.append(Candidate(removed, ks, 10, 5, kept, 2 * kept + 100, e_w, e_o))
    return LayerProfile(name, d_in, d_out, d_in * d_out, 2 * d_in * d_out, name, cands)


PROFILES = [_profile(f"l{i}", 32 * (1 + i % 3), 48, i) for i in range(5)]


def test_best_ks_is_chosen_by_the_same_cost():
    p = PROFILES[0]
    for cost, attr in (("weight", "error_weight"), ("output", "error_output")):
        opts = layer_options(p, cost)
        assert [o.removed_ratio for o in opts] == [0.1, 0.3, 0.5, 0.7]
        for o in opts:
            same_ratio = [c for c in p.candidates if c.removed_ratio == o.removed_ratio]
            assert getattr(o, attr) == min(getattr(c, attr) for c in same_ratio)


@pytest.mark.parametrize("cost", ["weight", "output"])
@pytest.mark.parametrize("target", [0.05, 0.2, 0.45, 0.65])
def test_allocation_is_optimal_and_meets_the_budget(cost, target):
    alloc = allocate(PROFILES, target, cost, alpha=None)
    assert alloc.achieved_removed_ratio >= target - 1e-12
    options = candidate_choices(PROFILES, cost)
    total = sum(p.dense_values for p in PROFILES)
    best = math.inf
    for combo in itertools.product(*options):
        removed = sum(c.dense_values - c.kept_values for c in combo)
        if removed >= math.ceil(target * total):
            best = min(best, sum(c.cost for c in combo))
    assert alloc.total_cost == pytest.approx(best, rel=1e-9)
    assert sum(c.cost for c in alloc.choices) == pytest.approx(alloc.total_cost, rel=1e-9)


def test_bytes_budget_counts_bytes():
    alloc = allocate(PROFILES, 0.4, "output", budget_count="bytes", alpha=None)
    assert alloc.achieved_removed_bytes_ratio >= 0.4
    assert alloc.kept_bytes == sum(c.kept_bytes for c in alloc.choices)


def test_infeasible_target_is_an_error_not_a_fallback():
    with pytest.raises(InfeasibleAllocationError, match="Lower --ratio"):
        allocate(PROFILES, 0.8, "weight", alpha=None)


def test_alpha_cap_drops_expensive_candidates():
    free = allocate(PROFILES, 0.3, "weight", alpha=None)
    capped = allocate(PROFILES, 0.3, "weight", alpha="auto")
    assert capped.alpha is not None and 1.0 <= capped.alpha <= 2.0
    assert capped.total_cost >= free.total_cost - 1e-12
    assert capped.achieved_removed_ratio >= 0.3
    cap = 1.0 if capped.alpha is None else capped.alpha
    at_target = [min((c for c in candidate_choices([p], "weight")[0] if not c.dense),
                     key=lambda c: abs(c.removed_ratio - 0.3)).cost for p in PROFILES]
    assert all(c.dense or c.cost <= cap * sum(at_target) / len(at_target) + 1e-12 for c in capped.choices)


def test_alpha_auto_solves_without_the_cap_when_no_cap_is_feasible():
    # one layer's only removable candidate costs 100x the others: every cap <= 2.0 drops it,
    # yet the target needs it, so "auto" falls back to the plain knapsack (still meeting the budget)
    cheap = [LayerProfile(f"c{i}", 10, 10, 100, 200, f"c{i}", [Candidate(0.5, 1.0, 2, 2, 50, 100, 0.1, 0.1)])
             for i in range(3)]
    costly = LayerProfile("x", 10, 10, 100, 200, "x", [Candidate(0.5, 1.0, 2, 2, 50, 100, 10.0, 10.0)])
    profiles = cheap + [costly]
    with pytest.raises(InfeasibleAllocationError):
        allocate(profiles, 0.5, "weight", alpha=2.0)
    alloc = allocate(profiles, 0.5, "weight", alpha="auto")
    assert alloc.alpha is None and alloc.achieved_removed_ratio >= 0.5
    assert all(not c.dense for c in alloc.choices)


def _shaped_profile(name, d_in, d_out, seed):
    """Candidates with the real (k, s) of the grid, so their run flops differ by ks."""
    import random
    from rocketlm.factorization.sparse_dictionary import candidate_shape, kept_bytes, kept_values
    rng = random.Random(seed)
    cands = []
    for removed in (0.1, 0.3, 0.5, 0.7):
        for ks in (1.0, 1.5, 2.0, 3.0):
            k, s = candidate_shape(d_in, d_out, removed, ks)
            e_w = removed * (1 + 0.3 * rng.random()) / ks ** 0.3
            cands.append(Candidate(removed, ks, k, s, kept_values(d_in, d_out, k, s),
                                   kept_bytes(d_in, d_out, k, s, 4), e_w, e_w * (1 + 0.1 * rng.random())))
    return LayerProfile(name, d_in, d_out, d_in * d_out, 4 * d_in * d_out, name, cands)


SHAPED = [_shaped_profile(f"s{i}", 32 * (1 + i % 3), 48, i) for i in range(4)]


def test_flops_budget_counts_run_flops_and_is_optimal():
    from rocketlm.allocation.plan import run_flops
    target = 0.35
    alloc = allocate(SHAPED, target, "weight", budget_count="flops", alpha=None)
    assert alloc.achieved_removed_flops_ratio >= target - 1e-12
    for c in alloc.choices:
        assert c.kept_flops == (c.dense_flops if c.dense else run_flops(c.d_in, c.d_out, c.k, c.s))
        assert c.kept_flops <= c.dense_flops
    options = candidate_choices(SHAPED, "weight", "flops")
    total = sum(p.dense_values for p in SHAPED)
    best = min(sum(c.cost for c in combo) for combo in itertools.product(*options)
               if sum(c.dense_flops - c.kept_flops for c in combo) >= math.ceil(target * total))
    assert alloc.total_cost == pytest.approx(best, rel=1e-9)


def test_flops_options_are_the_pareto_front():
    from rocketlm.allocation.plan import flops_options, run_flops
    p = SHAPED[1]
    front = flops_options(p, "weight")
    pts = [(run_flops(p.d_in, p.d_out, c.k, c.s), c.error_weight) for c in front]
    assert pts == sorted(pts) and all(a[1] > b[1] for a, b in zip(pts, pts[1:]))
    for c in p.candidates:  # every candidate is dominated by (or is) a front member
        f = run_flops(p.d_in, p.d_out, c.k, c.s)
        assert f >= p.d_in * p.d_out or any(pf <= f and pe <= c.error_weight for pf, pe in pts)


def test_unreachable_flops_budget_is_a_clear_error():
    with pytest.raises(InfeasibleAllocationError, match="flops"):
        allocate(SHAPED, 0.9, "weight", budget_count="flops", alpha=None)
