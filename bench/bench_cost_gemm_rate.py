"""GEMM rate of this machine at the shapes profiling and calibration use (prints figures; not a test).

The floor of an exact profiling or calibration pass is its multiply-add count divided by this rate:

    python bench/bench_cost_gemm_rate.py --threads 2
    # and the floor of exact profiling over a grid (the candidates' GEMMs at the float32 rate, each layer's
    # whitening and eigendecompositions at the float64 rate; multiply-adds from rocketlm.distributed.assign)
    python bench/bench_cost_gemm_rate.py --threads 2 --floor-grid "removed=0.05:0.70:0.05;ks=1,1.5,2,2.5,3"
"""
from __future__ import annotations

import argparse
import os
import time

import torch

# (m, inner, n): profiling candidates of SmolLM2-135M (k ~ 100..576, d_out 192..1536, r 192..576),
# calibration Gram updates (2048 tokens x 576 / 1536 features)
SHAPES = [(1100, 1536, 525), (976, 576, 400), (768, 1536, 192), (384, 192, 150), (576, 2048, 576), (1536, 2048, 1536)]


def rate(m: int, inner: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best GFLOP/s of ``(m x inner) @ (inner x n)`` over repeated calls (best = least disturbed by load)."""
    a = torch.randn(m, inner, dtype=dtype)
    b = torch.randn(inner, n, dtype=dtype)
    a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * inner * n / best / 1e9


def profiling_floor(model: str, grid: str, f32_gflops: float, f64_gflops: float) -> None:
    """Print the multiply-adds of exact profiling over ``grid`` and their time at the given GEMM rates."""
    from rocketlm.config import GridConfig
    from rocketlm.distributed.assign import basis_cost, candidate_cost
    from rocketlm.models.discovery import decoder_structure
    from rocketlm.models.loading import load_model
    from rocketlm.profiling.profile import valid_shapes

    net, _ = load_model(model)
    modules = dict(net.named_modules())
    parsed = GridConfig.parse(grid)
    basis = candidates = count = 0.0
    for name in decoder_structure(net).all_targets:
        d_out, d_in = modules[name].weight.shape
        basis += basis_cost(d_in, d_out)
        for _, _, k, s in valid_shapes(d_in, d_out, parsed):
            candidates += candidate_cost(d_in, d_out, k, s)
            count += 1
    seconds = 2 * candidates / (f32_gflops * 1e9) + 2 * basis / (f64_gflops * 1e9)
    print(f"exact profiling of {model} over {grid}: {int(count)} candidates, {2 * candidates / 1e12:.2f} TFLOP of "
          f"candidate GEMMs (float32) + {2 * basis / 1e12:.2f} TFLOP of whitening and eigendecompositions "
          f"(float64): {seconds:.1f} s at {f32_gflops:.0f} / {f64_gflops:.0f} GFLOP/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--floor-grid", default=None, help="also print the floor of exact profiling over this grid")
    p.add_argument("--model", default="smollm2-135m", help="model whose layers --floor-grid counts")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    profiling_rates = []
    for i, (m, inner, n) in enumerate(SHAPES):
        f32 = rate(m, inner, n, torch.float32, args.seconds)
        f64 = rate(m, inner, n, torch.float64, args.seconds)
        print(f"  ({m} x {inner}) @ ({inner} x {n}): float32 {f32:6.1f} GFLOP/s, float64 {f64:6.1f} GFLOP/s")
        if i < 4:  # the profiling shapes
            profiling_rates.append((f32, f64))
    if args.floor_grid:
        best32 = max(r[0] for r in profiling_rates)  # the best rate: the floor must not be an overestimate
        best64 = max(r[1] for r in profiling_rates)
        profiling_floor(args.model, args.floor_grid, best32, best64)


if __name__ == "__main__":
    main()
