"""Does profiling get slower with a small calibration? (issue: the cost of compressing; a 16 x 256 run once
took twice the full-grid profiling time of 256 x 1024 on a loaded machine.)

Profiles the layers of a few blocks of SmolLM2-135M over the full default grid (exhaustive) with Grams from
each calibration size, in one process, and prints per layer: seconds, candidates whose error is below the
float32 refinement threshold and how many candidate products were recomputed in float64 (the only step
whose work depends on the data). Grams go to --cache-dir (reused when present).

    OMP_NUM_THREADS=1 python bench/bench_cost_calibration_size.py --sizes 16x256,64x512 --blocks 0,15,29

Measured 2026-12-05 (one thread; the machine's other core busy with another one-thread job): the same time per
layer at 16 x 256 and 64 x 512 tokens (e.g. block 15 q_proj 1.91 / 2.03 s, gate_proj 4.38 / 5.07 s; block 29
down_proj 2.48 / 2.92 s; the 21 layers: 53.6 s / 56.9 s in all): no cliff. The one data-dependent cost is
block 0's attention (q, k, o: 150-270 of 294 candidates with errors below 0.02, recomputed in float64,
2.5-3x the time of the same layer elsewhere), at both sizes alike.
"""
from __future__ import annotations

import argparse
import time

import torch

import rocketlm.factorization.sparse_dictionary as sparse_dictionary
from rocketlm.calibration.run import calibration_windows, run_calibration
from rocketlm.calibration.store import GramStore
from rocketlm.config import GridConfig, RocketConfig
from rocketlm.factorization.whitening import weight_matrix, whitened_layers
from rocketlm.models.discovery import decoder_structure
from rocketlm.models.loading import load_model
from rocketlm.pipeline import run_keys, targets_fingerprint
from rocketlm.profiling.profile import profile_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", default="16x256,64x512", help="comma list of SAMPLESxSEQ_LEN")
    p.add_argument("--blocks", default="0,15,29")
    p.add_argument("--grid", default="removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    p.add_argument("--data", default=None)
    p.add_argument("--cache-dir", default="/tmp/rocketlm-calibration-size")
    args = p.parse_args()

    float64_products = [0]
    products = sparse_dictionary._products

    def counting(B, CT):  # count the float64 recomputations
        float64_products[0] += CT.dtype == torch.float64
        return products(B, CT)

    sparse_dictionary._products = counting
    model, tok = load_model(args.model)
    structure = decoder_structure(model)
    modules = dict(model.named_modules())
    grid = GridConfig.parse(args.grid)
    wanted = {n for b in map(int, args.blocks.split(",")) for n in structure.targets[b]}
    totals = {}
    for size in args.sizes.split(","):
        samples, seq_len = map(int, size.split("x"))
        config = RocketConfig(model=args.model, calib_samples=samples, calib_seq_len=seq_len)
        windows, _ = calibration_windows(tok, config, args.data)
        keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, torch.float32)
        store = GramStore(args.cache_dir, keys.calibration, {"samples": samples, "seq_len": seq_len})
        run_calibration(model, structure, windows, config, store, progress=False)
        totals[size] = 0.0
        for name, S, group in whitened_layers(structure, store, lambda n: n in wanted, config.whitening_eps,
                                              next(model.parameters()).device):
            float64_products[0] = 0
            start = time.perf_counter()
            profile = profile_layer(name, weight_matrix(modules[name]), S, grid, group=group, value_bytes=4,
                                    ridge_rel=config.ridge_rel, importance_power=config.importance_power,
                                    dtype=torch.float32, ks_search="exhaustive")
            seconds = time.perf_counter() - start
            totals[size] += seconds
            low = sum(min(c.error_weight, c.error_output) < sparse_dictionary._REFINE_BELOW for c in profile.candidates)
            print(f"{size:>8} {name:40s} {seconds:6.2f} s  {len(profile.candidates)} candidates, {low} below "
                  f"{sparse_dictionary._REFINE_BELOW}, {float64_products[0]} float64 products", flush=True)
    for size, seconds in totals.items():
        print(f"{size:>8} total {seconds:.1f} s over {len(wanted)} layers")


if __name__ == "__main__":
    main()
