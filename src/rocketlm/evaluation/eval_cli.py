"""`rocketlm eval`: zero-shot accuracy of a dense model or a compressed checkpoint (lm-eval)."""
from __future__ import annotations

import argparse

from rocketlm.config import RUNTIMES
from pathlib import Path


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot accuracy on the papers' benchmarks (lm-evaluation-harness, offline data)")
    p.add_argument("model", help="checkpoint directory, HF id, model directory, .gguf file, or preset")
    p.add_argument("--tasks", default="paper",
                   help="'paper' (8 tasks of the ROCKET papers), 'all' (+ winogrande, boolq) or a comma list")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (per subject for MMLU)")
    p.add_argument("--batch-size", default="8", help="batch size (or 'auto')")
    p.add_argument("--out", default=None, help="write results JSON here (with per-example correctness); every "
                   "answered request is also kept in OUT's .requests.sqlite until the run ends, so an interrupted "
                   "run resumes when started again with the same --out")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help="run-time form of compressed layers [auto]")
    p.add_argument("--data", default=None, help="data directory (default: $ROCKETLM_DATA); 'hub' = HF hub datasets")
    p.add_argument("-q", "--quiet", action="store_true")


def run_eval(args: argparse.Namespace, load_any) -> int:
    from rocketlm.evaluation.zeroshot import evaluate_zeroshot, format_table, resolve_tasks, save_json
    from rocketlm.evaluation.zeroshot.runner import remove_request_cache, request_cache_path

    tasks = resolve_tasks(args.tasks)  # unknown names fail before the model is loaded
    model, tokenizer = load_any(args.model, args.device, args.runtime)
    manifest = getattr(model, "rocketlm_manifest", None)
    info = {"source": args.model}
    if manifest:
        info.update(achieved_removed_ratio=manifest["allocation"]["achieved_removed_ratio"],
                    cost=manifest["config"]["cost"], rocketlm_config=manifest["config"])
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    cache = request_cache_path(args.out) if args.out else None
    result = evaluate_zeroshot(model, tokenizer, tasks, data_dir=args.data, limit=args.limit, batch_size=batch,
                               device=args.device, progress=not args.quiet, model_info=info, request_cache=cache)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(result, args.out)
        print(f"wrote {args.out}")
        remove_request_cache(cache)
    return 0
