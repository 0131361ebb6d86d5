"""Calibration Grams: float32 GEMM per batch accumulated in float64 vs float64 throughout, on SmolLM2-135M
(prints figures; not a test).

Runs the block-by-block calibration twice over the same windows (batch GEMMs in float64, then in
float32), reports wall and CPU seconds of each, the relative difference of every Gram, the floor of the
calibration pass (its multiply-adds at this machine's measured GEMM rate), and with ``--profile`` whether
the allocations (ref grid, both costs, --ratios) agree when profiled from either set of Grams.

    python bench/bench_cost_grams.py --calib-samples 64 --seq-len 512 --threads 2 --profile
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import rocketlm.calibration.grams as grams_module
from rocketlm import GridConfig, RocketConfig, load_model
from rocketlm.allocation.plan import allocate
from rocketlm.calibration.run import calibration_windows, run_calibration
from rocketlm.calibration.store import GramStore
from rocketlm.models.discovery import decoder_structure
from rocketlm.profiling.run import run_profiling
from rocketlm.profiling.store import ProfileStore


def gemm_rate(dtype: torch.dtype, m: int = 2048, n: int = 576, seconds: float = 1.0) -> float:
    """Best multiply-adds per second of an ``(n x m) @ (m x n)`` product (a batch Gram block)."""
    x = torch.randn(m, n, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        x.T @ x
        best = min(best, time.perf_counter() - t)
    return m * n * n / best


def calibration_macs(model, structure, tokens: int, seq_len: int) -> tuple[float, float]:
    """(block forward multiply-adds, Gram multiply-adds as computed: block upper triangle) of one pass."""
    modules = dict(model.named_modules())
    linear = sum(modules[n].in_features * modules[n].out_features for n in structure.all_targets)
    hidden = model.config.hidden_size
    attention = len(structure.blocks) * seq_len * hidden  # causal Q K^T and A V: about seq_len / 2 each per token
    forward = tokens * (linear + attention)
    gram = 0.0
    for block in structure.targets:
        # one Gram per distinct input: q/k/v share q's, gate/up share gate's (Llama-style names)
        inputs = [modules[n].in_features for n in block if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
        for d in inputs or [modules[n].in_features for n in block]:
            parts = max(1, round(d / 384))
            gram += tokens * d * d * (parts + 1) / (2 * parts)
    return forward, gram


def calibrate(model, structure, windows, config, root: str, work: torch.dtype) -> tuple[GramStore, float, float]:
    original = grams_module.gram_work_dtype
    grams_module.gram_work_dtype = lambda dtype: work
    try:
        store = GramStore(root, "bench", {})
        wall, cpu = time.perf_counter(), time.process_time()
        run_calibration(model, structure, windows, config, store, progress=False)
        return store, time.perf_counter() - wall, time.process_time() - cpu
    finally:
        grams_module.gram_work_dtype = original


def compare(a: GramStore, b: GramStore, blocks: int) -> tuple[float, float]:
    """Largest relative Frobenius difference of a Gram, and the largest entrywise difference in units of
    sqrt(G_ii G_jj) (correlation units)."""
    worst_frob = worst_entry = 0.0
    for block in range(blocks):
        ga, gb = a.get(block), b.get(block)
        for group, exact in ga.grams.items():
            diff = gb.grams[group] - exact
            worst_frob = max(worst_frob, float(diff.norm() / exact.norm()))
            scale = exact.diagonal().clamp_min(1e-300).sqrt()
            worst_entry = max(worst_entry, float((diff.abs() / (scale[:, None] * scale[None, :])).max()))
    return worst_frob, worst_entry


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--profile", action="store_true", help="also profile from both Gram sets and compare allocations")
    p.add_argument("--grid", default="removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0")
    p.add_argument("--ratios", default="0.2,0.5")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RocketConfig(removed_ratio=0.2, calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                          grid=GridConfig.parse(args.grid))
    model, tok = load_model("smollm2-135m")
    structure = decoder_structure(model)
    windows, _ = calibration_windows(tok, config, args.data)
    forward, gram = calibration_macs(model, structure, windows.numel(), args.seq_len)
    rates = {dt: gemm_rate(dt) for dt in (torch.float32, torch.float64)}
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; GEMM rate float32 "
          f"{2 * rates[torch.float32] / 1e9:.0f} GFLOP/s, float64 {2 * rates[torch.float64] / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp64, tempfile.TemporaryDirectory() as tmp32:
        stores = {}
        for name, work, root in (("float64", torch.float64, tmp64), ("float32", torch.float32, tmp32)):
            store, wall, cpu = calibrate(model, structure, windows, config, root, work)
            floor = forward / rates[torch.float32] + gram / rates[work]
            print(f"Gram GEMMs in {name}: wall {wall:.1f} s, CPU {cpu:.1f} s; floor {floor:.1f} s "
                  f"(forward {forward / 1e9:.0f} G multiply-adds in float32 + Grams {gram / 1e9:.0f} G in {name}), "
                  f"load average {os.getloadavg()[0]:.2f}")
            stores[name] = store
        frob, entry = compare(stores["float64"], stores["float32"], len(structure.blocks))
        print(f"float32 vs float64 Grams: largest relative Frobenius difference {frob:.2e}, "
              f"largest entry difference {entry:.2e} (units of sqrt(G_ii G_jj))")
        if args.profile:
            compare_allocations(model, structure, stores, config, [float(r) for r in args.ratios.split(",")])


def compare_allocations(model, structure, stores, config, ratios) -> None:
    value_dtype = next(model.parameters()).dtype
    choices = {}
    for name, store in stores.items():
        with tempfile.TemporaryDirectory() as tmp:
            profiles = run_profiling(model, structure, store, ProfileStore(tmp, "bench", {}), config, value_dtype,
                                     progress=False)
        for ratio in ratios:
            for cost in ("weight", "output"):
                alloc = allocate(profiles, ratio, cost)
                choices[(name, ratio, cost)] = [(c.name, c.removed_ratio, c.ks) for c in alloc.choices]
    for ratio in ratios:
        for cost in ("weight", "output"):
            a, b = choices[("float64", ratio, cost)], choices[("float32", ratio, cost)]
            differ = sum(x != y for x, y in zip(a, b))
            print(f"ratio {ratio} cost {cost}: " + ("identical allocation" if not differ else
                                                    f"{differ} layers allocated differently"))


if __name__ == "__main__":
    main()
