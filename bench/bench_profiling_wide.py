"""Profiling one wide synthetic layer with the incremental products' ``C^T`` rows aligned and not (prints figures;
not a test).

:func:`profile_layer` on a synthetic ``d_in x d_out`` layer (the estimate's inputs: :func:`synthetic_gram`,
:func:`synthetic_weight`), once per ``--row-align`` value per round, interleaved in one process;
``--row-align 1`` lays ``C^T`` out as before (rows of ``k`` values back to back). Prints each round's CPU
seconds (with one thread: the time on an idle machine), the medians and their ratio, and whether every
candidate's errors are bit-identical across the settings.

    OMP_NUM_THREADS=1 python bench/bench_profiling_wide.py --shape 2048x8192 --rounds 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rocketlm.factorization.sparse_dictionary as sparse_dictionary
from rocketlm.config import GridConfig
from rocketlm.estimation.probe_layers import synthetic_gram, synthetic_weight
from rocketlm.profiling.profile import profile_layer


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


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=shape, default=(2048, 8192), help="D_INxD_OUT [2048x8192: Llama-3.2-1B's MLP]")
    parser.add_argument("--grid", default="removed=0.25:0.45:0.05;ks=1.0:3.0:0.1",
                        help="candidate grid [a slice of the default grid's removed ratios, its every ks]")
    parser.add_argument("--row-align", type=aligns, default=[1, 16], help="row strides compared [1,16]")
    parser.add_argument("--rounds", type=positive, default=2)
    parser.add_argument("--ks-search", choices=["auto", "exhaustive"], default="auto")
    args = parser.parse_args()
    grid = GridConfig.parse(args.grid)
    d_in, d_out = args.shape
    S = sparse_dictionary.whitening_factor(synthetic_gram(d_in))
    W = synthetic_weight(d_in, d_out)
    print(f"layer {d_in}x{d_out}, grid {args.grid}, ks search {args.ks_search}, {torch.get_num_threads()} thread(s)")
    seconds: dict[int, list[float]] = {a: [] for a in args.row_align}
    errors: dict[int, dict] = {}
    for r in range(args.rounds):
        for align in args.row_align if r % 2 == 0 else args.row_align[::-1]:
            sparse_dictionary._ROW_ALIGN = align
            start = time.process_time()
            profile = profile_layer("bench", W, S, grid, group="g", value_bytes=4, ridge_rel=0.0, importance_power=0.5,
                                    dtype=torch.float32, ks_search=args.ks_search, search_costs=["output"])
            seconds[align].append(time.process_time() - start)
            errors[align] = {(c.k, c.s): (c.error_weight, c.error_output) for c in profile.candidates}
            print(f"round {r + 1}, row stride multiple of {align}: {seconds[align][-1]:.2f} s CPU "
                  f"({len(profile.candidates)} candidates)", flush=True)
    medians = {a: statistics.median(v) for a, v in seconds.items()}
    base = args.row_align[0]
    for align, median in medians.items():
        print(f"row stride multiple of {align}: median {median:.2f} s CPU ({medians[base] / median:.2f}x against {base})")
    same = all(errors[a] == errors[base] for a in errors)
    print("errors bit-identical across the settings:", same)


if __name__ == "__main__":
    main()
