"""End-to-end figures on SmolLM2-135M: per (ratio, cost) the achieved ratio, bytes on disk, stage
wall times / peak memory and WikiText-2 perplexity. One calibration and one profiling pass
(cached) serve every ratio and cost.

    python bench/bench_smollm2.py --calib-samples 64 --seq-len 512 \
        --grid "removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0" --ratios 0.2 --costs weight,output \
        --out runs/bench-quality-bar
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

from rocketlm import GridConfig, RocketConfig, compress, load_model, save_compressed
from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_text
from rocketlm.runtime import convert_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--grid", default="removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--costs", default="weight,output")
    p.add_argument("--budget-counts", default="values", help="comma list of values, bytes, flops")
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--ppl-limit", type=int, default=None, help="first N windows; 0 = no perplexity")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--data", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load_model("smollm2-135m")
    windows = token_windows(tok, wikitext2_text(args.data), args.ppl_seq_len)
    rows = []
    if not args.skip_dense and args.ppl_limit != 0:
        r = perplexity(dense, windows, limit=args.ppl_limit, progress=False)
        rows.append({"run": "dense", "ppl": r.perplexity, "ppl_windows": r.windows, "ppl_seconds": r.seconds})
        print(json.dumps(rows[-1]), flush=True)
    runs = [(float(r), c, b) for r in args.ratios.split(",") for c in args.costs.split(",")
            for b in args.budget_counts.split(",")]
    for ratio, cost, budget in runs:
        config = RocketConfig(model="smollm2-135m", removed_ratio=ratio, cost=cost, budget_count=budget,
                              calib_samples=args.calib_samples, calib_seq_len=args.seq_len, seed=args.seed,
                              grid=GridConfig.parse(args.grid))
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = compress(model, tok, config, cache_dir=args.cache_dir, data_dir=args.data, progress=False)
        total = time.perf_counter() - start
        manifest = save_compressed(result, out / (f"r{ratio}-{cost}" + ("" if budget == "values" else f"-{budget}")))
        if args.ppl_limit != 0:
            convert_model(model, "factored")  # exact, and much faster than the canonical form
            r = perplexity(model, windows, limit=args.ppl_limit, progress=False)
        rows.append({
            "run": f"{cost}@{ratio}/{budget}",
            **({"ppl": r.perplexity, "ppl_windows": r.windows, "ppl_seconds": r.seconds} if args.ppl_limit != 0 else {}),
            "achieved_removed_flops_ratio": result.allocation.achieved_removed_flops_ratio,
            "achieved_removed_ratio": result.allocation.achieved_removed_ratio,
            "layers_dense": sum(c.dense for c in result.allocation.choices),
            "bytes": manifest["weights_file"]["bytes"], "dense_bytes": manifest["dense_weights_bytes"],
            "compress_seconds": total,
            "stages": {k: {"s": round(v.seconds, 2), "peak_rss_gib": round(v.peak_rss_bytes / 2**30, 2)}
                       for k, v in result.stats.items()},
            "solve_seconds": result.allocation.solve_seconds,
        })
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
