"""Profiling one wide synthetic layer with the incremental products' ``C^T`` rows aligned and not, with the ks
search's borrowed products and without, and with the sparse steps' compiled loop and without (prints figures; not a
test).

:func:`profile_layer` on a synthetic ``d_in x d_out`` layer (the estimate's inputs: :func:`synthetic_gram`,
:func:`synthetic_weight`), once per ``--row-align`` x ``--borrow`` x ``--compiled-steps`` variant per round,
interleaved in one process; ``--row-align 1`` lays ``C^T`` out as before (rows of ``k`` values back to back);
``--borrow no`` computes a ks new to the search with dense products, as before
(``profiling.profile.KS_BORROW_STATES``); ``--compiled-steps no`` finds a sparse step's thresholds and changed entries
with torch's vectorised path, as before (``factorization.sparse_dictionary.COMPILED_STEPS``). Prints each round's CPU
seconds (with one thread: the time on an idle machine), the medians and their ratios to the first variant's, and
how many candidates each variant shares with the first and the largest difference of their errors.

    OMP_NUM_THREADS=1 python bench/bench_profiling_wide.py --shape 2048x8192 --row-align 1,16 --borrow no,yes
    OMP_NUM_THREADS=1 python bench/bench_profiling_wide.py --row-align 16 --compiled-steps no,yes
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rocketlm.factorization.sparse_dictionary as sparse_dictionary
import rocketlm.profiling.profile as profile_module
from rocketlm.config import GridConfig
from rocketlm.estimation.probe_layers import synthetic_gram, synthetic_weight
from rocketlm.profiling.profile import profile_layer

from bench_profiling import positive_int, yes_no_list  # the same option types (bench/ is the script's path)


def shape(text: str) -> tuple[int, int]:
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the layer as D_INxD_OUT, e.g. 2048x8192") from None
    if min(d_in, d_out) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: both dimensions must be at least 8")
    return d_in, d_out


def aligns(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,16")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=shape, default=(2048, 8192), help="D_INxD_OUT [2048x8192: Llama-3.2-1B's MLP]")
    parser.add_argument("--grid", default="removed=0.25:0.45:0.05;ks=1.0:3.0:0.1",
                        help="candidate grid [a slice of the default grid's removed ratios, its every ks]")
    parser.add_argument("--row-align", type=aligns, default=[1, 16], help="row strides compared [1,16]")
    parser.add_argument("--borrow", type=yes_no_list, default=[True], help="ks search borrowing products [yes]")
    parser.add_argument("--compiled-steps", type=yes_no_list, default=[True],
                        help="sparse steps' thresholds and changed entries by the compiled loop [yes]")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--ks-search", choices=["auto", "exhaustive"], default="auto")
    args = parser.parse_args()
    grid = GridConfig.parse(args.grid)
    d_in, d_out = args.shape
    S = sparse_dictionary.whitening_factor(synthetic_gram(d_in))
    W = synthetic_weight(d_in, d_out)
    print(f"layer {d_in}x{d_out}, grid {args.grid}, ks search {args.ks_search}, {torch.get_num_threads()} thread(s)")
    variants = [(a, b, c) for a in args.row_align for b in args.borrow for c in args.compiled_steps]
    name = {v: f"row stride multiple of {v[0]}, borrow {'yes' if v[1] else 'no'}, "
               f"compiled steps {'yes' if v[2] else 'no'}" for v in variants}
    seconds: dict[tuple, list[float]] = {v: [] for v in variants}
    errors: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            sparse_dictionary._ROW_ALIGN, profile_module.KS_BORROW_STATES, sparse_dictionary.COMPILED_STEPS = variant
            start = time.process_time()
            profile = profile_layer("bench", W, S, grid, group="g", value_bytes=4, ridge_rel=0.0, importance_power=0.5,
                                    dtype=torch.float32, ks_search=args.ks_search, search_costs=["output"])
            seconds[variant].append(time.process_time() - start)
            errors[variant] = {(c.k, c.s): (c.error_weight, c.error_output) for c in profile.candidates}
            print(f"round {r + 1}, {name[variant]}: {seconds[variant][-1]:.2f} s CPU "
                  f"({len(profile.candidates)} candidates)", flush=True)
    medians = {v: statistics.median(t) for v, t in seconds.items()}
    base = variants[0]
    for variant, median in medians.items():
        shared = errors[variant].keys() & errors[base].keys()
        gap = max((abs(a - b) for key in shared for a, b in zip(errors[variant][key], errors[base][key])), default=0.0)
        print(f"{name[variant]}: median {median:.2f} s CPU ({medians[base] / median:.2f}x against the first); "
              f"{len(shared)} of {len(errors[variant])} candidates shared with the first, errors within {gap:.2g}")


if __name__ == "__main__":
    main()
