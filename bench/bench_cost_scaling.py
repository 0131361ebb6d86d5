"""How the profiling and allocation costs grow (prints figures and writes two PNGs; not a test).

1. Profiling time of one square ``d x d`` layer against ``d`` (log-log, fitted exponent): the
   pipeline's own functions on synthetic inputs, whitening (:func:`whitening_factor`) and
   :func:`profile_layer` (the whitened SVD and every candidate of ``--grid``) timed separately, in
   CPU seconds (with one thread: the time on an idle machine, whatever the load; wall kept too).
2. Knapsack time (:func:`solve_mckp`) against layers x options per layer, on synthetic instances
   shaped like real ones (per layer, removed counts spread over 5..70% of a 70B layer's size,
   errors ``a * removed^p`` with noise), up to 2,000 layers x 300 options (a 70B Llama has 560
   target layers), in CPU seconds.

    OMP_NUM_THREADS=1 python bench/bench_cost_scaling.py --out docs/cost
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from rocketlm.allocation.knapsack import solve_mckp
from rocketlm.config import GridConfig
from rocketlm.estimation.probe_layers import synthetic_gram, synthetic_weight
from rocketlm.factorization.sparse_dictionary import whitening_factor
from rocketlm.profiling.profile import profile_layer, valid_shapes

COARSE = "removed=0.1:0.7:0.1;ks=1,2,3"
LLAMA_70B_SHAPES = [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192), (8192, 28672), (8192, 28672),
                    (28672, 8192)]


def fit(x, y) -> tuple[float, float]:
    """Least-squares slope and intercept of log y on log x."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope), float(intercept)


def _clocked(fn):
    """``fn()``, its wall seconds and its CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def time_layer(d: int, grid: GridConfig) -> dict:
    A = synthetic_gram(d)
    S, whiten_wall, whiten = _clocked(lambda: whitening_factor(A))
    W = synthetic_weight(d, d).T.contiguous().T  # d_in x d_out, as weight_matrix gives it
    profile, wall, seconds = _clocked(lambda: profile_layer("layer", W, S, grid, group="g", value_bytes=4,
                                                            ridge_rel=0.0, importance_power=0.5, dtype=torch.float32))
    return {"d": d, "whitening_s": whiten, "profile_s": seconds, "whitening_wall_s": whiten_wall,
            "profile_wall_s": wall, "candidates": len(profile.candidates), "load": round(os.getloadavg()[0], 2)}


def profiling_curve(widths: list[int], grid: GridConfig) -> list[dict]:
    rows = []
    for d in widths:
        row = time_layer(d, grid)
        rows.append(row)
        print(f"  d={d:5d}: whitening {row['whitening_s']:8.2f} s, profile_layer {row['profile_s']:9.2f} s "
              f"({row['candidates']} candidates; CPU seconds; wall "
              f"{row['whitening_wall_s'] + row['profile_wall_s']:.1f} s at load {row['load']})", flush=True)
    return rows


def instance(layers: int, options: int, rng: np.random.Generator) -> tuple[list, list, int]:
    """A knapsack instance shaped like real profiles (see the module doc)."""
    shapes = [LLAMA_70B_SHAPES[i % len(LLAMA_70B_SHAPES)] for i in range(layers)]
    removed, errors, total = [], [], 0
    for d_in, d_out in shapes:
        dense = d_in * d_out
        total += dense
        ratios = np.sort(rng.uniform(0.05, 0.70, options))
        scale, power = rng.lognormal(-0.5, 0.6), rng.uniform(0.8, 2.0)
        removed.append(np.concatenate([[0], np.round(ratios * dense)]).astype(np.int64))
        err = scale * ratios ** power * rng.lognormal(0.0, 0.05, options)
        errors.append(np.concatenate([[0.0], err]))
    return removed, errors, int(0.5 * total)


def knapsack_curve(layer_counts: list[int], option_counts: list[int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m in option_counts:
        for n in layer_counts:
            removed, errors, required = instance(n, m, rng)
            times = []
            for _ in range(repeats):
                solution, _, seconds = _clocked(lambda: solve_mckp(removed, errors, required))
                times.append(seconds)
            rows.append({"layers": n, "options": m, "seconds": float(np.median(times)),
                         "frontier_max": solution.frontier_max})
            print(f"  {n:5d} layers x {m:3d} options: {rows[-1]['seconds']:8.3f} s "
                  f"(frontier max {solution.frontier_max})", flush=True)
    return rows


def plot_profiling(rows: list[dict], path: Path, grid_text: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d"] for r in rows]
    total = [r["profile_s"] + r["whitening_s"] for r in rows]
    slope, intercept = fit(d, total)
    top = fit(d[-3:], total[-3:])[0] if len(d) >= 3 else slope
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    ax.loglog(d, total, "o-", label="whitening + profile_layer")
    ax.loglog(d, [r["profile_s"] for r in rows], "s--", alpha=0.7, label="profile_layer (SVD + candidates)")
    ax.loglog(d, [r["whitening_s"] for r in rows], "^:", alpha=0.7, label="whitening (Cholesky)")
    xs = np.array([d[0], d[-1]], float)
    ax.loglog(xs, np.exp(intercept) * xs ** slope, "k-", lw=0.8, label=f"fit: time ~ d^{slope:.2f}")
    ax.set_xlabel("layer width d (square d x d layer)")
    ax.set_ylabel("CPU seconds per layer (1 thread)")
    ax.set_title(f"Profiling one layer, grid '{grid_text}'", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"exponent": slope, "exponent_top3": top}


def plot_knapsack(rows: list[dict], path: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = [r["layers"] * r["options"] for r in rows]
    seconds = [r["seconds"] for r in rows]
    slope, intercept = fit(size, seconds)
    # separately: log t = a log L + b log m + c
    X = np.column_stack([np.log([r["layers"] for r in rows]), np.log([r["options"] for r in rows]), np.ones(len(rows))])
    (a, b, _), *_ = np.linalg.lstsq(X, np.log(seconds), rcond=None)
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for m in sorted({r["options"] for r in rows}):
        sub = [r for r in rows if r["options"] == m]
        ax.loglog([r["layers"] * m for r in sub], [r["seconds"] for r in sub], "o-", label=f"{m} options per layer")
    xs = np.array([min(size), max(size)], float)
    ax.loglog(xs, np.exp(intercept) * xs ** slope, "k-", lw=0.8, label=f"fit: time ~ (L x m)^{slope:.2f}")
    ax.set_xlabel("layers x options per layer")
    ax.set_ylabel("solve_mckp CPU seconds")
    ax.set_title(f"Exact multiple-choice knapsack (synthetic 70B-shaped instances): ~ L^{a:.2f} m^{b:.2f}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"exponent": slope, "exponent_layers": float(a), "exponent_options": float(b)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="512,1024,2048,4096,8192")
    p.add_argument("--grid", default=COARSE)
    p.add_argument("--layers", default="100,200,500,1000,2000")
    p.add_argument("--options", default="15,50,100,300")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", choices=("profiling", "knapsack"), help="leave one curve out")
    p.add_argument("--out", default="docs/cost", help="directory of the PNGs and scaling.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"threads": torch.get_num_threads(), "load_start": round(os.getloadavg()[0], 2)}
    if args.skip != "profiling":
        print(f"profiling one square layer, grid {args.grid!r}, {torch.get_num_threads()} thread(s):")
        rows = profiling_curve([int(w) for w in args.widths.split(",")], GridConfig.parse(args.grid))
        results["profiling"] = {"rows": rows, **plot_profiling(rows, out / "profiling_vs_width.png", args.grid)}
        print(f"profiling time per layer ~ d^{results['profiling']['exponent']:.2f} "
              f"(top three widths: d^{results['profiling']['exponent_top3']:.2f})")
    if args.skip != "knapsack":
        print("knapsack:")
        rows = knapsack_curve([int(v) for v in args.layers.split(",")], [int(v) for v in args.options.split(",")],
                              args.repeats)
        results["knapsack"] = {"rows": rows, **plot_knapsack(rows, out / "knapsack_vs_size.png")}
        k = results["knapsack"]
        print(f"knapsack time ~ (layers x options)^{k['exponent']:.2f}; separately ~ layers^{k['exponent_layers']:.2f} "
              f"x options^{k['exponent_options']:.2f}: "
              f"{'superlinear' if k['exponent'] > 1.1 else 'about linear' if k['exponent'] > 0.9 else 'sublinear'}")
    results["load_end"] = round(os.getloadavg()[0], 2)
    (out / "scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
