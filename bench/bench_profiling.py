"""Profiling and allocation speed on SmolLM2-135M (prints figures; not a test).

Calibrates (or reuses cached Grams from --cache-dir), then profiles every targeted layer into a
fresh temporary profile store and times it, then times the knapsack for both costs.

    python bench/bench_profiling.py --calib-samples 64 --seq-len 512 \
        --grid "removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0" --cache-dir runs/cache
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

import torch

from rocketlm import GridConfig, RocketConfig, load_model
from rocketlm.allocation.plan import allocate
from rocketlm.models.discovery import decoder_structure
from rocketlm.calibration.run import calibration_windows, run_calibration
from rocketlm.pipeline import default_cache_dir, run_keys, targets_fingerprint
from rocketlm.profiling.run import run_profiling
from rocketlm.calibration.store import GramStore
from rocketlm.profiling.store import ProfileStore


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grid", default="removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--data", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RocketConfig(removed_ratio=0.2, calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                          grid=GridConfig.parse(args.grid))
    model, tok = load_model("smollm2-135m")
    structure = decoder_structure(model)
    value_dtype = next(model.parameters()).dtype
    windows, _ = calibration_windows(tok, config, args.data)
    keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, value_dtype)
    grams = GramStore(args.cache_dir or default_cache_dir(), keys.calibration, {})
    start = time.perf_counter()
    run_calibration(model, structure, windows, config, grams, progress=False)
    print(f"calibration (0 s if cached): {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        store = ProfileStore(tmp, keys.profile, {})
        start = time.perf_counter()
        profiles = run_profiling(model, structure, grams, store, config, value_dtype, progress=False)
        total = time.perf_counter() - start
    per_kind = collections.defaultdict(list)
    for prof in profiles:
        per_kind[prof.name.rsplit(".", 1)[1]].append((prof.seconds, len(prof.candidates)))
    n_cand = sum(len(p.candidates) for p in profiles)
    print(f"profiling: {len(profiles)} layers, {n_cand} candidates, {total:.1f} s "
          f"({1000 * total / n_cand:.2f} ms per candidate), torch threads {torch.get_num_threads()}")
    for kind, rows in per_kind.items():
        secs = [s for s, _ in rows]
        print(f"  {kind:<10} {sum(secs):7.1f} s total, {1000 * sum(secs) / sum(c for _, c in rows):6.2f} ms/candidate")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for cost in ("weight", "output"):
            start = time.perf_counter()
            alloc = allocate(profiles, ratio, cost, alpha=None)
            print(json.dumps({"ratio": ratio, "cost": cost, "solve_s": round(time.perf_counter() - start, 4),
                              "achieved": round(alloc.achieved_removed_ratio, 5),
                              "gap_to_lp_bound": alloc.total_cost - alloc.lower_bound}))


if __name__ == "__main__":
    main()
