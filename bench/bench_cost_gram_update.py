"""One batch's Gram update at calibration's shapes: the update as calibration runs it against the earlier one
(prints figures; not a test).

Calibration adds every batch's ``X^T X`` (``tokens x d`` float32 activations) into a float64 Gram with
:func:`rocketlm.calibration.grams.add_gram_`. The earlier update checked every activation for NaN/Inf first
(``torch.isfinite(X).all()``); the current one checks the product's diagonal. Both cut the columns into
``round(d / block)`` blocks (``--blocks``: block widths of the current update to time; 384 is calibration's).
Variants are timed interleaved, round after round (the median over rounds), so a shared machine's drift hits them
alike; a plain ``X^T X`` GEMM gives the rate.

    python bench/bench_cost_gram_update.py --threads 2 --tokens 4096 --widths 576,1536 --rounds 15
    # whole calibration passes of SmolLM2-135M (every block, 16 windows x 1024), the two updates alternating
    python bench/bench_cost_gram_update.py --threads 2 --model-windows 16 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rocketlm.calibration.grams as grams_module
from rocketlm.calibration.grams import add_gram_


def earlier_update(G: torch.Tensor, X: torch.Tensor, block: int = 384) -> None:
    """The update calibration ran before: a NaN/Inf pass over ``X``, then ``round(d / block)`` column blocks."""
    if not torch.isfinite(X).all():
        raise ValueError("non-finite activation")
    d = X.shape[1]
    n = max(1, round(d / block))
    edges = [round(i * d / n) for i in range(n + 1)]
    for i in range(n):
        a, b = edges[i], edges[i + 1]
        Xi = X[:, a:b]
        for j in range(i, n):
            c, e = edges[j], edges[j + 1]
            part = Xi.T @ X[:, c:e]
            if j == i:
                G[a:b, a:b] += 0.5 * (part + part.T)
            else:
                G[a:b, c:e] += part
                G[c:e, a:b] += part.T


def earlier_add(G: torch.Tensor, X: torch.Tensor, block: int = 384) -> bool:
    earlier_update(G, X, block)
    return True


def calibration_passes(windows: int, seq_len: int, rounds: int, data: str | None) -> None:
    """Whole block-by-block calibration passes over SmolLM2-135M with either update, alternating."""
    from rocketlm import RocketConfig, load_model
    from rocketlm.calibration.run import calibration_windows
    from rocketlm.models.discovery import decoder_structure
    config = RocketConfig(removed_ratio=0.2, calib_samples=windows, calib_seq_len=seq_len)
    model, tokenizer = load_model("smollm2-135m")
    structure = decoder_structure(model)
    ids, _ = calibration_windows(tokenizer, config, data)
    times = {"earlier": [], "current": []}
    results = {}
    for _ in range(rounds):
        for name, fn in (("earlier", earlier_add), ("current", add_gram_)):
            grams_module.add_gram_ = fn
            start = time.perf_counter()
            results[name] = {group: g for _, block in grams_module.iterate_block_grams(
                model, structure, ids, config.calib_batch_size) for group, g in block.grams.items()}
            times[name].append(time.perf_counter() - start)
    grams_module.add_gram_ = add_gram_
    differ = sum(not torch.equal(results["earlier"][g], results["current"][g]) for g in results["current"])
    earlier, current = statistics.median(times["earlier"]), statistics.median(times["current"])
    print(f"calibration of SmolLM2-135M, {windows} x {seq_len} tokens, {torch.get_num_threads()} threads, median of "
          f"{rounds} alternating passes: earlier update {earlier:.1f} s, current {current:.1f} s: "
          f"{earlier / current:.2f}x; Grams bit-identical: {'yes' if not differ else f'no ({differ} differ)'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (calibration: 4 x 1024)")
    p.add_argument("--widths", default="576,1536", help="Gram widths (SmolLM2-135M: 576 hidden, 1536 MLP)")
    p.add_argument("--blocks", default="384,192", help="block widths of the current update to time [384,192]")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--model-windows", type=int, default=0, help="time whole calibration passes of SmolLM2-135M "
                                                                 "over this many windows instead")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--data", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_windows:
        return calibration_passes(args.model_windows, args.seq_len, args.rounds, args.data)
    for d in (int(w) for w in args.widths.split(",")):
        X = torch.randn(args.tokens, d)
        G = torch.zeros(d, d, dtype=torch.float64)
        variants = {"earlier (isfinite + round(d/384) blocks)": lambda: earlier_update(G, X),
                    "plain X^T X (float32 GEMM only)": lambda: X.T @ X}
        for block in (int(b) for b in args.blocks.split(",")):
            variants[f"current, block {block} ({max(1, round(d / block))} column blocks)"] = \
                lambda block=block: add_gram_(G, X, block=block)
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[next(iter(variants))])
        print(f"{args.tokens} x {d} activations, {args.threads} threads, median of {args.rounds} interleaved rounds:")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<48} {median * 1e3:7.2f} ms  {base / median:5.2f}x the earlier update's speed")


if __name__ == "__main__":
    main()
