"""The ks search of profiling: equals the full scan where the error is unimodal in ks, scans where not."""
import math

import pytest
import torch

from rocketlm.allocation.costs import available_costs, get_cost
from rocketlm.allocation.plan import layer_options
from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.factorization.sparse_dictionary import whitening_factor
from rocketlm.profiling.profile import (Candidate, LayerProfile, descend, ks_lookahead, profile_layer, search_ks,
                                        unimodal)


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


def test_search_equals_scan_on_unimodal_errors_and_evaluates_fewer():
    n = 21
    curves = {r: ([(i / 20 - 0.3 - r) ** 2 + r for i in range(n)], [(i / 20 - 0.6 + r / 2) ** 2 for i in range(n)])
              for r in (0.1, 0.2, 0.3, 0.4)}
    rows, table = _rows(curves)
    found, calls = _search(rows, table)
    assert len(set(calls)) == len(calls) < 0.5 * len(table)  # each candidate evaluated once, most never
    for error in ("error_weight", "error_output"):
        assert _best(found, error) == _best(table.values(), error)


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


def test_descend_and_unimodal_helpers():
    values = [3, 2, 2, 1, 4]
    assert descend(values.__getitem__, len(values), 0, 2) == 3  # over the plateau
    assert descend(values.__getitem__, len(values), 4, 1) == 3
    assert descend([1, 1, 1].__getitem__, 3, 2, 1) == 0  # ties go to the smaller ks
    assert unimodal([3, 2, 2, 1, 4, 5]) and not unimodal([3, 1, 2, 1]) and unimodal([])
    assert ks_lookahead(GridConfig.parse("ks=1.0:3.0:0.1")) == 2
    assert ks_lookahead(GridConfig.parse("ks=1,1.5,2,2.5,3")) == 1


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
    assert RocketConfig().ks_search == "exhaustive"
    assert RocketConfig(ks_search="exhaustive").ks_search == "exhaustive"
    with pytest.raises(ConfigError, match="ks_search"):
        RocketConfig(ks_search="golden")
    assert "weight" in available_costs()
