"""Quality of the compression-stage options on SmolLM2-135M (prints figures; not a test).

For each variant: load the model, compress it at the reference settings (64 x 512 calibration tokens,
removed 0.05..0.70 x ks {1, 1.5, 2, 2.5, 3}; the dense Grams and profiles come from the cache), then
WikiText-2 perplexity on the first --ppl-limit windows of 2048 tokens. One JSON line per variant is
appended to --out (a rerun skips the variants already there), with every stage's seconds.

Variants are '+'-joined tokens over ``--cost`` with no refits: ``base`` (the closed form, ROCKET's), ``seq`` (sequential calibration), ``corr``
(upstream correction), ``dampX`` (sequential damping X), ``refineN`` (N alternating refits), ``cost=NAME`` (allocation cost), ``alpha=A``.

    OMP_NUM_THREADS=2 python bench/bench_quality.py --ratio 0.5 --cost weight \\
        --variants base,seq,seq+corr,refine3,seq+corr+refine3 --ppl-limit 40 --out runs/quality.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rocketlm import GridConfig, RocketConfig, load_model
from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_text
from rocketlm.pipeline import compress
from rocketlm.runtime import convert_model

REFERENCE_GRID = "removed=0.05:0.70:0.05;ks=1,1.5,2,2.5,3"


def variant_options(variant: str) -> dict:
    options: dict = {}
    for token in variant.split("+"):
        if token == "base":
            continue
        if token == "seq":
            options["sequential"] = True
        elif token == "corr":
            options["upstream_correction"] = True
        elif token.startswith("refine"):
            options["refine_iters"] = int(token[len("refine"):])
        elif token.startswith("cost="):
            options["cost"] = token.split("=", 1)[1]
        elif token.startswith("alpha="):
            options["alpha"] = token.split("=", 1)[1]
        elif token.startswith("damp"):
            options["sequential_damping"] = float(token[len("damp"):])
        elif token.startswith("samples="):
            options["sensitivity_samples"] = int(token.split("=", 1)[1])
        else:
            raise SystemExit(f"unknown variant token {token!r}")
    return options


def run_variant(variant: str, args, windows: torch.Tensor) -> dict:
    config = RocketConfig(removed_ratio=args.ratio, cost=args.cost, calib_samples=args.calib_samples,
                          calib_seq_len=args.seq_len, seed=args.seed, grid=GridConfig.parse(args.grid),
                          ks_search=args.ks_search, refine_iters=0, sequential=False,
                          upstream_correction=False, sequential_damping=0.0)  # variants add to the closed form
    config = config.replace(**variant_options(variant))
    model, tokenizer = load_model("smollm2-135m")
    start = time.perf_counter()
    result = compress(model, tokenizer, config, cache_dir=args.cache_dir, data_dir=args.data, progress=False)
    seconds = time.perf_counter() - start
    convert_model(model, "factored")  # exact, and much faster than the canonical form
    ppl = perplexity(model, windows, limit=args.ppl_limit, progress=False)
    refit = {k: v for k, v in result.checks.get("refit", {}).items() if k != "per_layer"}
    return {"variant": variant, "ratio": args.ratio, "cost": config.cost, "ppl": ppl.perplexity,
            "windows": ppl.windows, "ppl_seconds": ppl.seconds, "compress_seconds": seconds,
            "stages": {name: s.seconds for name, s in result.stats.items()},
            "achieved_removed_ratio": result.allocation.achieved_removed_ratio, "alpha": result.allocation.alpha,
            "dense_layers": sum(c.dense for c in result.allocation.choices), "refit": refit,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--cost", default="weight")
    p.add_argument("--variants", default="base,seq,seq+corr,refine3,seq+corr+refine3")
    p.add_argument("--ppl-limit", type=int, default=40)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--grid", default=REFERENCE_GRID)
    p.add_argument("--ks-search", default="exhaustive", help="profiles' ks search [exhaustive: every candidate]")
    p.add_argument("--data", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {(r["variant"], r["ratio"], r["cost"], r["windows"]) for r in map(json.loads, out.read_text().splitlines())}
    _, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, wikitext2_text(args.data), 2048)
    for variant in args.variants.split(","):
        cost = variant_options(variant).get("cost", args.cost)
        if (variant, args.ratio, cost, min(args.ppl_limit or len(windows), len(windows))) in done:
            continue
        record = run_variant(variant, args, windows)
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
