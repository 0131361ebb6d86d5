"""Weight- vs output-cost divergence straight from a stored profile (prints figures; not a test).

Reads a profile store's ``layers.jsonl`` (under ``$ROCKETLM_CACHE/profiles/<key>/``) and prints the
per-layer Spearman summary, the share of (layer, ratio) pairs whose best ks differs, and how many
layers the two costs allocate differently, with and without the alpha cap:

    python bench/divergence_from_profiles.py ~/.cache/rocketlm/profiles/<key>/layers.jsonl --ratios 0.2,0.5
"""
from __future__ import annotations

import argparse
import json

from rocketlm.allocation.plan import allocate
from rocketlm.profiling.profile import LayerProfile
from rocketlm.study.analysis import (allocation_difference, best_ks_disagreement, correlation_summary,
                                     error_correlations)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profiles", help="a profile store's layers.jsonl")
    p.add_argument("--ratios", default="0.2,0.5")
    args = p.parse_args()
    with open(args.profiles) as f:
        profiles = [LayerProfile.from_json(json.loads(line)) for line in f if line.strip()]
    print(f"{len(profiles)} layers, {sum(len(p.candidates) for p in profiles)} candidates")
    summary = correlation_summary(error_correlations(profiles))
    if summary.median is not None and summary.min is not None and summary.share_above is not None:
        print(f"Spearman(weight error, output error) per layer: median {summary.median:.4f}, "
              f"min {summary.min:.4f}, {100 * summary.share_above:.1f}% of layers above {summary.threshold}")
    ks = best_ks_disagreement(profiles, "weight", "output")
    print(f"best ks differs for {ks.n_differ}/{ks.n_pairs} (layer, ratio) pairs ({100 * ks.share:.1f}%)")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for alpha in ("auto", None):
            diff = allocation_difference(allocate(profiles, ratio, "weight", alpha=alpha),
                                         allocate(profiles, ratio, "output", alpha=alpha))
            print(f"removed {ratio:g}, alpha {alpha or 'off'}: {diff.n_differ}/{diff.n_layers} layers allocated "
                  f"differently ({diff.n_differ_ratio} with another removed ratio)")


if __name__ == "__main__":
    main()
