"""Micro-benchmark of the exact MCKP solver (rocketlm.allocation.knapsack).

Usage:  python bench/bench_knapsack.py [--seeds N] [--milp] [--milp-time-limit S]

Builds realistic random instances (per group: a dense option plus options whose
removed counts are distinct large integers and whose error grows roughly
convexly with the removed ratio, with multiplicative noise) and prints the
solve wall time, DP frontier sizes and LP gap for a few targets.

``--milp`` also solves every instance with scipy's HiGHS MILP
(``scipy.optimize.milp``), the general-purpose alternative the hand-written
solver is measured against, and prints its time and its relative difference
from the exact optimum (HiGHS stops at its default relative MIP gap of 1e-4, so
small positive differences are expected; nan means it found no solution within
``--milp-time-limit``, which it can overrun while presolving).
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


def solve_with_milp(removed, error, required: int, time_limit: float) -> tuple[float, float, str]:
    """The same problem as a 0/1 MILP for HiGHS: (seconds, objective, status message)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    n_options = sum(r.size for r in removed)
    group_of = np.repeat(np.arange(len(removed)), [r.size for r in removed])
    one_per_group = csr_array((np.ones(n_options), (group_of, np.arange(n_options))),
                              shape=(len(removed), n_options))
    budget = np.concatenate(removed).astype(np.float64)[None, :]
    start = time.perf_counter()
    result = milp(np.concatenate(error), integrality=np.ones(n_options), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_per_group, 1, 1), LinearConstraint(budget, required, np.inf)],
                  options={"time_limit": time_limit})
    seconds = time.perf_counter() - start
    return seconds, (float(result.fun) if result.x is not None else float("nan")), result.message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.15, 0.0],
                        help="multiplicative error noise levels (0 = smooth convex, the hardest case)")
    parser.add_argument("--milp", action="store_true", help="also time scipy's HiGHS MILP on every instance")
    parser.add_argument("--milp-time-limit", type=float, default=120.0, help="seconds per MILP solve [120]")
    args = parser.parse_args()
    milp_header = f" {'milp_s':>8} {'milp_rel_diff':>13}" if args.milp else ""
    print(f"{'shape':>9} {'noise':>5} {'target':>6} {'seed':>4} {'time_s':>7} {'front_max':>9} "
          f"{'front_sum':>10} {'lp_gap':>9}{milp_header}")
    cases = [(n, m, noise) for noise in args.noise for n, m in [(210, 15), (300, 300)]]
    for n_groups, n_options, noise in cases:
        for frac in (0.05, 0.2, 0.4, 0.7):
            times = []
            for seed in range(args.seeds):
                rng = np.random.default_rng(1000 * n_options + seed)
                removed, error = make_instance(n_groups, n_options, rng, noise)
                required = int(frac * sum(int(r.max()) for r in removed))
                start = time.perf_counter()
                sol = solve_mckp(removed, error, required)
                seconds = time.perf_counter() - start
                times.append(seconds)
                gap = (sol.total_error - sol.lower_bound) / sol.total_error
                milp_columns = ""
                if args.milp:
                    milp_seconds, milp_error, message = solve_with_milp(removed, error, required,
                                                                        args.milp_time_limit)
                    rel_diff = (milp_error - sol.total_error) / sol.total_error
                    milp_columns = f" {milp_seconds:>8.2f} {rel_diff:>13.2e}"
                    if milp_seconds >= args.milp_time_limit:
                        milp_columns += f"  ({message})"
                print(
                    f"{n_groups:>4}x{n_options:<4} {noise:>5.2f} {frac:>6.2f} {seed:>4} {seconds:>7.3f} "
                    f"{sol.frontier_max:>9} {sol.frontier_total:>10} {gap:>9.2e}{milp_columns}"
                )
            print(f"{'':>9} {'':>5} {frac:>6.2f} {'max':>4} {max(times):>7.3f}")


if __name__ == "__main__":
    main()
