"""Run-time figures of compressed checkpoints against their dense model (issue: compressed models that pay off).

Speed: every model is loaded into one process and measured interleaved (median of --runs), at each
thread count of --threads; ratios are taken against the dense model of the same run. Memory: the
resident weight bytes in that process, plus each model's peak RSS measured alone in a fresh
subprocess (load + one prefill + one decode). Perplexity: WikiText-2, first --ppl-windows windows.

    python bench/bench_inference.py --dense smollm2-135m \
        --checkpoints runs/inf-20-weight-values runs/inf-50-weight-flops ... --threads 1,2 --runs 3 \
        --ppl-windows 40 --out runs/bench-inference.json
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from rocketlm.checkpoint.io import is_checkpoint, load_compressed, read_manifest
from rocketlm.config import RUNTIMES
from rocketlm.models.loading import load_model
from rocketlm.runtime.benchmark import compare_speed, memory_figures, time_decode, time_prefill

log = logging.getLogger("bench_inference")


def _load(name: str, runtime: str):
    if is_checkpoint(name):
        model, tok = load_compressed(name, runtime=runtime)
        targets = [c["name"] for c in read_manifest(name)["allocation"]["choices"]]
        return model, tok, targets
    model, tok = load_model(name)
    return model, tok, None


def peak_rss_alone(name: str, runtime: str) -> int:
    """Peak RSS (bytes) of a fresh process that loads ``name`` and runs one prefill and one decode."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", name, "--runtime", runtime],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _rss_child(name: str, runtime: str) -> None:
    model, _, _ = _load(name, runtime)
    time_prefill(model, 512)
    time_decode(model, 128, 8)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over fork + exec)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()
    print(int(status[0]) * 1024)


def _ppl(model, tokenizer, windows_limit: int) -> float:
    from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_text
    windows = token_windows(tokenizer, wikitext2_text(), 2048)
    return perplexity(model, windows, limit=windows_limit, progress=False).perplexity


def _describe(name: str) -> dict:
    if not is_checkpoint(name):
        return {"model": name, "kind": "dense"}
    manifest = read_manifest(name)
    alloc, cfg = manifest["allocation"], manifest["config"]
    return {"model": name, "kind": "compressed", "ratio": cfg["removed_ratio"], "cost": cfg["cost"],
            "budget_count": cfg["budget_count"], "achieved_removed_values": alloc["achieved_removed_ratio"],
            "achieved_removed_flops": alloc.get("achieved_removed_flops_ratio")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--checkpoints", nargs="*", default=[])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--runtime", default="auto", help="comma list of run-time forms (rocketlm's --runtime); with more "
                   "than one, every checkpoint is loaded in each, all measured in one process [auto]")
    p.add_argument("--ppl-windows", type=int, default=0, help="WikiText-2 windows for perplexity (0: skip)")
    p.add_argument("--out", default=None)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, args.runtime)
        return
    runtimes = args.runtime.split(",")
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"--runtime {','.join(bad)}: choose from {', '.join(RUNTIMES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    runs = [(args.dense, runtimes[0])] + [(c, r) for c in args.checkpoints for r in runtimes]
    labels = {(name, r): name if name == args.dense or len(runtimes) == 1 else f"{name} [{r}]" for name, r in runs}
    loaded = {labels[name, r]: _load(name, r) for name, r in runs}
    rows = {labels[name, r]: dict(_describe(name), runtime=r) for name, r in runs}
    dense_targets = next((t for _, _, t in loaded.values() if t is not None), None)
    for (name, runtime), label in labels.items():
        model, tok, targets = loaded[label]
        mem = memory_figures(model, targets if targets is not None else dense_targets)
        rows[label].update(resident_weight_bytes=mem.resident_weight_bytes, targeted_bytes=mem.targeted_layers_bytes,
                           targeted_dense_bytes=mem.targeted_layers_dense_bytes,
                           peak_rss_bytes=peak_rss_alone(name, runtime))
        forms = [type(m).__name__ for n, m in model.named_modules() if targets and n in set(targets)]
        rows[label]["forms"] = {f: forms.count(f) for f in sorted(set(forms))}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        speed = compare_speed({n: m for n, (m, _, _) in loaded.items()}, runs=args.runs)
        for name, fig in speed.items():
            rows[name][f"threads_{threads}"] = {"prefill_tok_s": fig.prefill_tokens_per_s,
                                                "decode_tok_s": fig.decode_tokens_per_s}
    if args.ppl_windows:
        torch.set_num_threads(max(int(t) for t in args.threads.split(",")))
        for name, (model, tok, _) in loaded.items():
            rows[name]["ppl"] = _ppl(model, tok, args.ppl_windows)
    _print_table(rows, args.dense, [int(t) for t in args.threads.split(",")], args.ppl_windows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


def _print_table(rows: dict, dense: str, threads: list[int], ppl_windows: int) -> None:
    base = rows[dense]
    print(f"{'model':<34} {'weights MB':>11} {'targeted':>9} {'peak RSS MB':>12}", end="")
    for t in threads:
        print(f" {f'prefill {t}t':>15} {f'decode {t}t':>15}", end="")
    print(f" {'PPL' + str(ppl_windows):>8}" if ppl_windows else "")
    for name, row in rows.items():
        label = (f"{Path(row['model']).name}{name[len(row['model']):]}" if row["kind"] == "compressed"
                 else f"{name} (dense)")
        tgt = row["targeted_bytes"] / base["targeted_bytes"]
        print(f"{label:<34} {row['resident_weight_bytes'] / 1e6:7.1f} {row['resident_weight_bytes'] / base['resident_weight_bytes']:.2f}x"
              f" {tgt:8.2f}x {row['peak_rss_bytes'] / 1e6:12.1f}", end="")
        for t in threads:
            r, b = row[f"threads_{t}"], base[f"threads_{t}"]
            print(f" {r['prefill_tok_s']:7.0f} {r['prefill_tok_s'] / b['prefill_tok_s']:.2f}x"
                  f" {r['decode_tok_s']:7.1f} {r['decode_tok_s'] / b['decode_tok_s']:.2f}x", end="")
        print(f" {row['ppl']:8.2f}" if ppl_windows else "")


if __name__ == "__main__":
    main()
