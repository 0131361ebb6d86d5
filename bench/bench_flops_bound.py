"""The whole-model speed-up a checkpoint can reach at most, from multiply-adds per token (prints a table).

A compressed model still runs the parts rocketlm does not compress: the lm_head (vocabulary x hidden)
and attention's score and value products. Per token of a prefill of ``L`` tokens (mean context
``(L + 1) / 2``), counted in multiply-adds:

    dense    = targeted layers (sum d_in d_out) + lm_head (V h / L) + attention (2 x layers x heads x head_dim x context)
    compact  = targeted layers as they run (min(d_in k + k d_out, d_in d_out) per compressed layer) + the same rest

The lm_head runs on the last position only (``logits_to_keep=1``, as ``generate`` and
``bench_inference.py``'s prefill run it), so it is ``V h`` once per prefill, ``V h / L`` per token;
``--all-logits`` counts it on every position, as a perplexity evaluation runs it.

``dense / compact`` bounds the prefill speed-up (compute-bound); for decode at batch 1 (memory-bound)
the bound is the ratio of weight bytes read per token, ``dense weights / compact weights``, a compressed
layer read as the values of the form that runs (``d_in k + k d_out``, or the merged ``d_in d_out``), the
embedding matrix once for the head. Reads the checkpoints' ``rocketlm.json`` and ``config.json``.

    python bench/bench_flops_bound.py runs/inf/r0*
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def layer_flops(choice: dict) -> int:
    dense = choice["d_in"] * choice["d_out"]
    if choice["dense"]:
        return dense
    return min(choice["d_in"] * choice["k"] + choice["k"] * choice["d_out"], dense)


def bounds(checkpoint: Path, prefill_tokens: int, all_logits: bool = False) -> dict:
    manifest = json.loads((checkpoint / "rocketlm.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    choices = manifest["allocation"]["choices"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    attention = 2 * layers * config["num_attention_heads"] * head_dim * (prefill_tokens + 1) / 2
    head = config["vocab_size"] * hidden / (1 if all_logits else prefill_tokens)
    targeted_dense = sum(c["d_in"] * c["d_out"] for c in choices)
    targeted_run = sum(layer_flops(c) for c in choices)
    dense, compact = targeted_dense + head + attention, targeted_run + head + attention
    weights_dense = manifest["dense_weights_bytes"]
    element = manifest["allocation"]["dense_bytes"] / manifest["allocation"]["dense_values"]
    weights_compact = weights_dense - element * (targeted_dense - targeted_run)  # the forms' values are read
    return {"checkpoint": checkpoint.name, "targeted_removed_flops": 1 - targeted_run / targeted_dense,
            "untargeted_share": (head + attention) / dense, "prefill_bound": dense / compact,
            "decode_bound": weights_dense / weights_compact}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--all-logits", action="store_true", help="the lm_head on every prefill position")
    args = p.parse_args()
    print("| checkpoint | targeted multiply-adds removed | untargeted share of dense | prefill bound | decode bound |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        if not (Path(path) / "rocketlm.json").is_file():
            continue
        b = bounds(Path(path), args.prefill_tokens, args.all_logits)
        print(f"| {b['checkpoint']} | {b['targeted_removed_flops']:.1%} | {b['untargeted_share']:.1%} | "
              f"{b['prefill_bound']:.2f}x | {b['decode_bound']:.2f}x |")


if __name__ == "__main__":
    main()
