"""Zero-shot accuracy of two compressed checkpoints, paired per document (prints a table; not a test).

Reads two ``rocketlm eval --out`` results (per-document correctness) of checkpoints compressed from the
same model, and reports per task and for the mean over tasks the accuracy of each and the paired
difference (b - a) with a percentile bootstrap interval over documents (the study's
:func:`rocketlm.study.stats.paired_bootstrap`, tasks as strata).

    rocketlm eval runs/q/w50 --tasks piqa,arc_easy,sciq --limit 500 --out runs/q/w50-eval.json
    rocketlm eval runs/q/f50r3 --tasks piqa,arc_easy,sciq --limit 500 --out runs/q/f50r3-eval.json
    python bench/bench_quality_zeroshot.py runs/q/w50-eval.json runs/q/f50r3-eval.json --labels weight,fisher+refine3
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from rocketlm.study.stats import paired_bootstrap


def aligned(a: dict, b: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-document scores of both runs on the documents both scored, in ``a``'s order."""
    index = {d: i for i, d in enumerate(b["doc_id"])}
    common = [(i, index[d]) for i, d in enumerate(a["doc_id"]) if d in index]
    xa = np.asarray([a[metric][i] for i, _ in common], dtype=np.float64)
    xb = np.asarray([b[metric][j] for _, j in common], dtype=np.float64)
    return xa, xb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="eval JSON of the reference checkpoint")
    p.add_argument("b", help="eval JSON of the compared checkpoint")
    p.add_argument("--labels", default="a,b")
    p.add_argument("--metric", default="acc")
    p.add_argument("--n-boot", type=int, default=10000)
    p.add_argument("--confidence", type=float, default=0.95)
    args = p.parse_args()
    label_a, label_b = args.labels.split(",")
    runs = [json.load(open(path))["tasks"] for path in (args.a, args.b)]
    tasks = [t for t in runs[0] if t in runs[1] and args.metric in runs[0][t].get("per_example", {})]
    print(f"| task | documents | {label_a} | {label_b} | difference ({args.confidence:.0%} CI) |")
    print("|---|---|---|---|---|")
    strata, means = [], []
    for task in tasks:
        xa, xb = aligned(runs[0][task]["per_example"], runs[1][task]["per_example"], args.metric)
        ci = paired_bootstrap([(xb - xa)[None, :]], n_boot=args.n_boot, confidence=args.confidence)
        strata.append((xb - xa)[None, :])
        means.append((xa.mean(), xb.mean()))
        print(f"| {task} | {len(xa)} | {xa.mean():.4f} | {xb.mean():.4f} | {ci.mean_diff:+.4f} "
              f"[{ci.low:+.4f}, {ci.high:+.4f}]{' *' if ci.significant else ''} |")
    ci = paired_bootstrap(strata, n_boot=args.n_boot, confidence=args.confidence)
    mean_a, mean_b = (float(np.mean([m[i] for m in means])) for i in (0, 1))
    print(f"| mean of {len(tasks)} tasks | {ci.n_examples} | {mean_a:.4f} | {mean_b:.4f} | {ci.mean_diff:+.4f} "
          f"[{ci.low:+.4f}, {ci.high:+.4f}]{' *' if ci.significant else ''} |")
    print(f"\n* = the interval excludes 0 (paired bootstrap over documents, {args.n_boot} resamples, tasks as strata)")


if __name__ == "__main__":
    main()
