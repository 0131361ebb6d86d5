"""The ks search of profiling: equals the full scan where the error is unimodal in ks, scans around its minima (or the
whole row) where not."""
import math

import pytest
import torch

from rocketlm.allocation.costs import available_costs, get_cost
from rocketlm.allocation.plan import layer_options
from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.factorization.sparse_dictionary import whitening_factor
from rocketlm.allocation.plan import allocate
from rocketlm.errors import ProfileMismatchError, RocketError
from rocketlm.pipeline import run_keys
from rocketlm.profiling.profile import (Candidate, LayerProfile, descend, ks_lookahead, profile_layer, run_ks_search,
                                        search_ks, unimodal)
from rocketlm.study.config import StudyConfig


def _candidate(removed, ks, w, o):
    return Candidate(removed_ratio=removed, ks=ks, k=10, s=5, kept_values=0, kept_bytes=0, error_weight=w, error_output=o)


def _rows(curves):
    """``curves[removed] = (weights, outputs)`` over ks 1.0, 1.1, ... -> rows of shapes and a lookup."""
    rows, table = [], {}
    for removed, (weights, outputs) in curves.items():
        row = []
        for i, (w, o) in enumerate(zip(weights, outputs)):
            shape = (removed, round(1.0 + 0.1 * i, 1), 10 + i, 5)
            table[shape] = _candidate(shape[0], shape[1], w, o)
            row.append(shape)
        rows.append(row)
    return rows, table


def _search(rows, table, lookahead=1):
    calls = []

    def evaluate(shape):
        calls.append(shape)
        return table[shape]
    found = search_ks(rows, evaluate, [lambda c: c.error_weight, lambda c: c.error_output], lookahead)
    return found, calls


def _best(cands, error):
    by_removed = {}
    for c in cands:
        if c.removed_ratio not in by_removed or getattr(c, error) < getattr(by_removed[c.removed_ratio], error):
            by_removed[c.removed_ratio] = c
    return {r: c.ks for r, c in by_removed.items()}


def _bowls(output_centre: float, n: int = 21):
    """Rows of two unimodal errors over ks (weight: minimum near 0.3 + r, output near ``output_centre`` - r / 2)."""
    return _rows({r: ([(i / 20 - 0.3 - r) ** 2 + r for i in range(n)], [(i / 20 - output_centre + r / 2) ** 2
                                                                         for i in range(n)])
                  for r in (0.1, 0.2, 0.3, 0.4)})


def test_search_equals_scan_on_unimodal_errors_and_evaluates_fewer():
    rows, table = _bowls(0.6)
    found, calls = _search(rows, table)
    assert len(set(calls)) == len(calls) < 0.5 * len(table)  # each candidate evaluated once, most never
    for error in ("error_weight", "error_output"):
        assert _best(found, error) == _best(table.values(), error)


def test_searching_one_cost_visits_fewer_candidates_than_two():
    rows, table = _bowls(0.8)
    _, both = _search(rows, table)
    calls = []
    found = search_ks(rows, lambda shape: calls.append(shape) or table[shape], [lambda c: c.error_output], 1)
    assert len(calls) < len(both) and _best(found, "error_output") == _best(table.values(), "error_output")


def test_search_scans_a_row_whose_evaluated_errors_are_not_unimodal():
    # the descent from the middle finds a local minimum; a second cost's descent sees the other valley
    weights = [5, 4, 3, 2, 3, 4, 5, 6, 7, 8, 1]
    outputs = [9, 8, 7, 6, 5, 4, 3, 2.5, 2, 1.5, 1]
    rows, table = _rows({0.1: (weights, outputs)})
    found, calls = _search(rows, table)
    assert len(found) == len(weights)  # fell back to the scan
    assert _best(found, "error_weight") == {0.1: 2.0}


def test_search_lookahead_steps_over_a_wiggle_and_the_wiggle_triggers_the_scan():
    weights = [9, 8, 7, 6, 6.5, 5, 4, 5, 6, 7, 8]  # a rise of one step on the way down
    rows, table = _rows({0.1: (weights, weights)})
    _, calls = _search(rows, table, lookahead=1)
    assert len(calls) < len(weights)  # one step of lookahead stops at the wiggle, and sees nothing wrong
    found, _ = _search(rows, table, lookahead=2)
    assert _best(found, "error_weight") == {0.1: 1.6}
    assert len(found) == len(weights)  # it saw the wiggle (not unimodal): the row was scanned


def test_a_wiggle_with_a_reach_evaluates_around_the_minimum_and_descends_on_from_its_best():
    # one cost, descent from the middle (index 10) with a lookahead of 2: it steps over the wiggle at 8 and stops
    # at 7, having seen 9 < 8 > 7 (not unimodal); a lower valley at 3, 4 steps from 7, and a far one at 20
    values = [4.0, 3.9, 3.8, 3.5, 4.4, 4.3, 4.2, 4.0, 5.5, 5.0, 6.0, 6.5] + [7.0] * 8 + [0.5]
    rows, table = _rows({0.1: (values, values)})

    def search(reach):
        calls = []
        found = search_ks(rows, lambda shape: calls.append(shape) or table[shape], [lambda c: c.error_weight], 2,
                          reach=reach)
        return _best(found, "error_weight")[0.1], sorted(round((shape[1] - 1.0) * 10) for shape in calls)

    best, seen = search(None)
    assert best == 3.0 and seen == list(range(len(values)))  # the whole row
    best, seen = search(2)  # 7 +- 4: 3..11; the descent on from 3 looks 2 further left, and stops there
    assert best == 1.3 and seen == list(range(1, 12))
    best, seen = search(1)  # 7 +- 2: nothing new below 4.0
    assert best == 1.7 and seen == list(range(5, 11))


def test_descend_and_unimodal_helpers():
    values = [3, 2, 2, 1, 4]
    assert descend(values.__getitem__, len(values), 0, 2) == 3  # over the plateau
    assert descend(values.__getitem__, len(values), 4, 1) == 3
    assert descend([1, 1, 1].__getitem__, 3, 2, 1) == 0  # ties go to the smaller ks
    assert unimodal([3, 2, 2, 1, 4, 5]) and not unimodal([3, 1, 2, 1]) and unimodal([])
    assert ks_lookahead(GridConfig.parse("ks=1.0:3.0:0.1")) == 3
    assert ks_lookahead(GridConfig.parse("ks=1,1.5,2,2.5,3")) == 2


def _layer(d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    X = torch.randn(6 * d_in, d_in, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    return W, whitening_factor(X.T @ X)


@pytest.mark.parametrize("grid", ["removed=0.05:0.70:0.05;ks=1.0:3.0:0.1", "removed=0.1:0.7:0.1;ks=1,1.5,2,2.5,3"])
def test_profile_search_matches_exhaustive_where_unimodal(grid):
    grid = GridConfig.parse(grid)
    W, S = _layer(48, 96)
    kwargs = dict(group="g", value_bytes=2, ridge_rel=0.0, importance_power=0.5, dtype=torch.float64)
    full = profile_layer("l", W, S, grid, ks_search="exhaustive", **kwargs)
    auto = profile_layer("l", W, S, grid, ks_search="auto", **kwargs)
    assert auto.ks_search == "auto" and len(auto.candidates) <= len(full.candidates)
    errors = {(c.removed_ratio, c.ks): (c.error_weight, c.error_output) for c in full.candidates}
    for c in auto.candidates:  # the same errors as the scan (same computation)
        assert (c.error_weight, c.error_output) == pytest.approx(errors[(c.removed_ratio, c.ks)], abs=1e-12)
    for cost in ("weight", "output", "blend"):
        fn = get_cost(cost).fn
        for removed in grid.removed_ratios:
            row = [fn(full, c) for c in full.candidates if c.removed_ratio == removed]
            if row and unimodal(row):
                best_full = [c.ks for c in layer_options(full, cost) if c.removed_ratio == removed]
                best_auto = [c.ks for c in layer_options(auto, cost) if c.removed_ratio == removed]
                assert best_auto == best_full, (cost, removed)


def test_profile_json_round_trip_keeps_the_search_mode():
    W, S = _layer(16, 24)
    p = profile_layer("l", W, S, GridConfig.parse("removed=0.2,0.5;ks=1,2"), group="g", value_bytes=2, ridge_rel=0.0,
                      importance_power=0.5, dtype=torch.float32, ks_search="auto")
    assert LayerProfile.from_json(p.to_json()).ks_search == "auto"
    old = p.to_json()
    del old["ks_search"]  # a store written before the search existed
    assert LayerProfile.from_json(old).ks_search == "exhaustive"


def test_config_validates_ks_search():
    assert RocketConfig().ks_search == "auto"
    assert RocketConfig(ks_search="exhaustive").ks_search == "exhaustive"
    with pytest.raises(ConfigError, match="ks_search"):
        RocketConfig(ks_search="golden")
    assert "weight" in available_costs()


def test_the_run_searches_the_best_ks_of_its_own_cost_and_a_flops_budget_scans(tmp_path):
    run = lambda **kw: run_ks_search(RocketConfig(**kw))  # noqa: E731  (the default grid: 21 ks values)
    assert run(cost="weight") == ("auto", ("weight",))
    assert run(cost="fisher", budget_count="bytes") == ("auto", ("output",))  # sensitivity x output^2: output's ks
    assert run(cost="output", budget_count="flops") == ("exhaustive", ())  # Pareto fronts need every candidate
    assert run(cost="weight", ks_search="exhaustive") == ("exhaustive", ())
    # the reference grid's 5 ks values: the descent would see nearly every one, so one exhaustive profile
    assert run(cost="weight", grid=GridConfig.parse("removed=0.1,0.5;ks=1,1.5,2,2.5,3")) == ("exhaustive", ())
    assert run(cost="weight", grid=GridConfig.parse("removed=0.1,0.5;ks=1:2:0.1"))[0] == "auto"
    # the profile store is keyed by what was searched: fisher reuses output's profiles, weight has its own
    key = lambda **kw: run_keys("m", torch.zeros(2, 4, dtype=torch.long), type("S", (), {"all_targets": ["a"]})(),
                                RocketConfig(**kw), torch.float32).profile
    assert key(cost="fisher") == key(cost="output") != key(cost="weight") != key(ks_search="exhaustive")
    assert key(ks_search="exhaustive", cost="weight") == key(ks_search="exhaustive", cost="output")
    assert StudyConfig(model="m", out=str(tmp_path)).run_config(0, 0.2, "output").ks_search == "exhaustive"


@pytest.mark.parametrize("cost", ["weight", "output", "blend"])
def test_searching_one_cost_finds_its_best_ks(cost):
    grid = GridConfig.parse("removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    W, S = _layer(48, 96, seed=1)
    kwargs = dict(group="g", value_bytes=2, ridge_rel=0.0, importance_power=0.5, dtype=torch.float64)
    full = profile_layer("l", W, S, grid, ks_search="exhaustive", **kwargs)
    every = profile_layer("l", W, S, grid, ks_search="auto", **kwargs)
    one = profile_layer("l", W, S, grid, ks_search="auto", search_costs=[cost], **kwargs)
    # (small random layers wiggle in ks, so most rows are scanned here; on SmolLM2 one cost visits 64-78%)
    assert one.search_costs == [cost] and len(one.candidates) <= len(every.candidates) <= len(full.candidates)
    fn = get_cost(cost).fn
    for removed in grid.removed_ratios:
        row = [fn(full, c) for c in full.candidates if c.removed_ratio == removed]
        if row and unimodal(row):
            assert ([c.ks for c in layer_options(one, cost) if c.removed_ratio == removed]
                    == [c.ks for c in layer_options(full, cost) if c.removed_ratio == removed]), removed


def test_profiles_searched_for_one_cost_refuse_another_cost_and_the_flops_budget():
    W, S = _layer(32, 48)
    grid = GridConfig.parse("removed=0.2,0.5;ks=1,1.5,2,2.5,3")
    kwargs = dict(group="g", value_bytes=2, ridge_rel=0.0, importance_power=0.5, dtype=torch.float64)
    searched = profile_layer("l", W, S, grid, ks_search="auto", search_costs=["output"], **kwargs)
    assert searched.serves("output") and searched.serves("fisher") and not searched.serves("weight")
    assert not searched.serves("output", "flops")
    assert allocate([searched], 0.3, "output", alpha=None).achieved_removed_ratio >= 0.3
    with pytest.raises(ProfileMismatchError, match="--ks-search exhaustive") as err:
        allocate([searched], 0.3, "weight", alpha=None)
    assert isinstance(err.value, RocketError)
    with pytest.raises(ProfileMismatchError, match="flops budget"):
        allocate([searched], 0.3, "output", "flops", alpha=None)
    full = profile_layer("l", W, S, grid, ks_search="exhaustive", **kwargs)
    assert all(full.serves(c, b) for c in available_costs() for b in ("values", "bytes", "flops"))
    # stored and read back; a store written before the search took one cost served the three it searched
    assert LayerProfile.from_json(searched.to_json()).search_costs == ["output"]
    old = searched.to_json()
    del old["search_costs"]
    assert LayerProfile.from_json(old).serves("weight") and LayerProfile.from_json(old).serves("blend")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_a_ks_new_to_the_search_starts_from_held_products_with_the_same_errors(monkeypatch, dtype, tol):
    """The search reaches a ks without products of its own from a copy of another ks's (fewer dense products);
    the candidates and their errors are those of dense products, and the copied-from state is left intact."""
    from rocketlm.factorization import sparse_dictionary
    from rocketlm.profiling import profile as profile_module

    grid = GridConfig.parse("removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    W, S = _layer(64, 160)
    dense, real = [], sparse_dictionary._products
    monkeypatch.setattr(sparse_dictionary, "_products", lambda *a: dense.append(1) or real(*a))
    runs = {}
    for borrow in (False, True):
        monkeypatch.setattr(profile_module, "KS_BORROW_STATES", borrow)
        dense.clear()
        profile = profile_layer("l", W, S, grid, group="g", value_bytes=2, ridge_rel=0.0, importance_power=0.5,
                                dtype=dtype, ks_search="auto", search_costs=["output"])
        runs[borrow] = ({(c.removed_ratio, c.ks): (c.error_weight, c.error_output) for c in profile.candidates},
                        len(dense), layer_options(profile, "output"))
    (plain, plain_dense, plain_best), (borrowed, borrowed_dense, borrowed_best) = runs[False], runs[True]
    assert borrowed_dense < plain_dense  # 11 against 19 on this layer
    assert borrowed.keys() == plain.keys() and [c.ks for c in borrowed_best] == [c.ks for c in plain_best]
    for key, errors in borrowed.items():
        assert errors == pytest.approx(plain[key], abs=tol), key
