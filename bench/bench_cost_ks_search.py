"""The ks search replayed on an exhaustive profile store (prints figures; not a test).

For every layer of a stored exhaustive profile (JSON lines, e.g. from ``bench/bench_profiling.py
--ks-search exhaustive --save FILE``), runs :func:`rocketlm.profiling.profile.search_ks` with the stored
errors as the oracle and reports: how often each cost's error is unimodal in ks, the share of
candidates (and of their multiply-adds) the search evaluates, the (layer, removed ratio, cost) whose
best ks it misses, and whether the allocations at --ratios agree with the exhaustive ones.

    python bench/bench_cost_ks_search.py /tmp/profiles.exhaustive.jsonl --ks 1,1.5,2,2.5,3
"""
from __future__ import annotations

import argparse
import collections
import json

from rocketlm.allocation.plan import allocate
from rocketlm.config import GridConfig
from rocketlm.profiling.profile import (LayerProfile, ks_lookahead, profiling_time_costs, search_ks, searchable_costs,
                                        unimodal)


def candidate_macs(profile: LayerProfile, k: int, s: int) -> float:
    """Multiply-adds of one candidate's exact errors computed densely (C C^T as 3/4, B_rot C^T, solve, Cholesky)."""
    r = min(profile.d_in, profile.d_out)
    return 0.0 if s >= k else 0.75 * k * k * profile.d_out + r * k * profile.d_out + k * k * r + k ** 3 / 3


def replay(profile: LayerProfile, lookahead: int, stats: collections.Counter) -> LayerProfile:
    """The profile the search would have stored; counts evaluations, multiply-adds and missed best ks."""
    costs = searchable_costs(profile)
    by_removed = collections.defaultdict(list)
    for c in profile.candidates:
        by_removed[c.removed_ratio].append(c)
    rows = [sorted(row, key=lambda c: c.ks) for _, row in sorted(by_removed.items())]
    shapes = [[(c.removed_ratio, c.ks, c.k, c.s) for c in row] for row in rows]
    lookup = {(c.removed_ratio, c.ks): c for c in profile.candidates}
    found = search_ks(shapes, lambda shape: lookup[shape[:2]], costs, lookahead, free=lambda sh: sh[3] >= sh[2])
    stats["candidates"] += len(profile.candidates)
    stats["evaluated"] += len(found)
    stats["macs"] += sum(candidate_macs(profile, c.k, c.s) for c in profile.candidates)
    stats["macs evaluated"] += sum(candidate_macs(profile, c.k, c.s) for c in found)
    kept = {(c.removed_ratio, c.ks) for c in found}
    for row in rows:
        for i, cost in enumerate(costs):
            values = [cost(c) for c in row]
            stats[f"rows, cost {i}"] += 1
            stats[f"unimodal rows, cost {i}"] += unimodal(values)
            best = min(range(len(row)), key=lambda j: (values[j], j))
            got = min((j for j in range(len(row)) if (row[j].removed_ratio, row[j].ks) in kept),
                      key=lambda j: (values[j], j))
            stats[f"missed best ks, cost {i}"] += got != best
    return LayerProfile(**{**profile.__dict__, "candidates": found, "ks_search": "auto"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profiles", help="exhaustive profile store (JSON lines)")
    p.add_argument("--ks", default=None, help="restrict to these ks (comma list), e.g. the reference grid's")
    p.add_argument("--ratios", default="0.2,0.5")
    args = p.parse_args()
    profiles = [LayerProfile.from_json(json.loads(line)) for line in open(args.profiles)]
    if args.ks:
        keep = {float(v) for v in args.ks.split(",")}
        for prof in profiles:
            prof.candidates = [c for c in prof.candidates if c.ks in keep]
    grid = GridConfig(ks=tuple(sorted({c.ks for p in profiles for c in p.candidates})))
    stats: collections.Counter = collections.Counter()
    searched = [replay(prof, ks_lookahead(grid), stats) for prof in profiles]
    print(f"ks grid {grid.ks}, lookahead {ks_lookahead(grid)} steps")
    print(f"evaluated {stats['evaluated']} / {stats['candidates']} candidates, "
          f"{stats['macs evaluated'] / stats['macs']:.3f} of the multiply-adds")
    for i, name in enumerate(profiling_time_costs()):
        print(f"  {name}: error unimodal in ks in {stats[f'unimodal rows, cost {i}']} of {stats[f'rows, cost {i}']} "
              f"(layer, removed ratio) rows; best ks missed in {stats[f'missed best ks, cost {i}']}")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for cost in ("weight", "output"):
            for alpha in ("auto", None):
                full = [(c.name, c.removed_ratio, c.ks) for c in allocate(profiles, ratio, cost, alpha=alpha).choices]
                got = [(c.name, c.removed_ratio, c.ks) for c in allocate(searched, ratio, cost, alpha=alpha).choices]
                differ = sum(a != b for a, b in zip(full, got))
                print(f"ratio {ratio} cost {cost} alpha {alpha}: "
                      + ("identical allocation" if not differ else f"{differ} layers allocated differently"))


if __name__ == "__main__":
    main()
