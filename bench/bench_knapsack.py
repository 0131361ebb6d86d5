"""Micro-benchmark of the exact MCKP solver (rocketlm.allocation.knapsack).

Usage:  python bench/bench_knapsack.py [--seeds N]

Builds realistic random instances (per group: a dense option plus options whose
removed counts are distinct large integers and whose error grows roughly
convexly with the removed ratio, with multiplicative noise) and prints the
solve wall time, DP frontier sizes and LP gap for a few targets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rocketlm.allocation.knapsack import solve_mckp


def make_instance(n_groups: int, n_options: int, rng: np.random.Generator, noise: float = 0.15):
    removed, error = [], []
    for _ in range(n_groups):
        size = int(rng.integers(100_000, 1_200_000))
        ratios = np.sort(rng.uniform(0.01, 0.95, n_options - 1))
        power = rng.uniform(1.2, 3.0)
        scale = float(rng.lognormal(0.0, 1.0))
        err = scale * ratios**power * np.exp(noise * rng.standard_normal(ratios.size))
        removed.append(np.concatenate(([0], np.round(ratios * size).astype(np.int64))))
        error.append(np.concatenate(([0.0], err)))
    return removed, error


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.15, 0.0],
                    help="multiplicative error noise levels (0 = smooth convex, the hardest case)")
    args = ap.parse_args()
    print(f"{'shape':>9} {'noise':>5} {'target':>6} {'seed':>4} {'time_s':>7} {'front_max':>9} {'front_sum':>10} {'lp_gap':>9}")
    cases = [(n, m, noise) for noise in args.noise for n, m in [(210, 15), (300, 300)]]
    for n_groups, n_options, noise in cases:
        for frac in (0.05, 0.2, 0.4, 0.7):
            times = []
            for seed in range(args.seeds):
                rng = np.random.default_rng(1000 * n_options + seed)
                removed, error = make_instance(n_groups, n_options, rng, noise)
                required = int(frac * sum(int(r.max()) for r in removed))
                t0 = time.perf_counter()
                sol = solve_mckp(removed, error, required)
                dt = time.perf_counter() - t0
                times.append(dt)
                gap = (sol.total_error - sol.lower_bound) / sol.total_error
                print(
                    f"{n_groups:>4}x{n_options:<4} {noise:>5.2f} {frac:>6.2f} {seed:>4} {dt:>7.3f} "
                    f"{sol.frontier_max:>9} {sol.frontier_total:>10} {gap:>9.2e}"
                )
            print(f"{'':>9} {'':>5} {frac:>6.2f} {'max':>4} {max(times):>7.3f}")


if __name__ == "__main__":
    main()
