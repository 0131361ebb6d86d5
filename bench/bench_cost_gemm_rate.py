"""GEMM rate of this machine at the shapes profiling and calibration use (prints figures; not a test).

The floor of an exact profiling or calibration pass is its multiply-add count divided by this rate:

    python bench/bench_cost_gemm_rate.py --threads 2
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for m, inner, n in SHAPES:
        f32 = rate(m, inner, n, torch.float32, args.seconds)
        f64 = rate(m, inner, n, torch.float64, args.seconds)
        print(f"  ({m} x {inner}) @ ({inner} x {n}): float32 {f32:6.1f} GFLOP/s, float64 {f64:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
