"""Command-line interface: argument parsing and printing only; the work is in the library verbs."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rocketlm.config import (BUDGET_COUNTS, RUNTIMES, SEQUENTIAL_AUTO_DAMPING, SEQUENTIAL_AUTO_FROM_REMOVED,
                             ConfigError, GridConfig, RocketConfig)
from rocketlm.errors import RocketError

log = logging.getLogger("rocketlm")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="run-time form of compressed layers: auto (fastest measured on this device), compact (per "
                        "layer the exact form with the fewest resident bytes: memory first, it can run slower than "
                        "dense), factored, sparse, packed, merged, canonical [auto]")
    p.add_argument("--data", default=None, help="data directory (default: $ROCKETLM_DATA)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _compress_parser(sub) -> None:
    from rocketlm.config import KS_SEARCHES
    d = RocketConfig()
    p = sub.add_parser("compress", help="compress a model with ROCKET and save a compact checkpoint",
                       argument_default=None)
    p.add_argument("model", help="HF hub id, local model directory, .gguf file, or preset (smollm2-135m)")
    p.add_argument("--ratio", type=float, help="fraction of the targeted parameters to REMOVE, e.g. 0.5 (required)")
    p.add_argument("--cost", help=f"allocation cost: weight (ROCKET), output (ROCKET-ActCost), ... (default {d.cost})")
    p.add_argument("--out", required=True, help="output checkpoint directory (new, empty, or an earlier "
                                                "checkpoint with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier rocketlm checkpoint in --out")
    p.add_argument("--budget-count", choices=BUDGET_COUNTS,
                   help="count the budget in stored values (paper, default), bytes on disk incl. the index bitmap, "
                        "or flops (multiply-adds per token of the form each layer runs in)")
    p.add_argument("--alpha", help="the reference's error cap: a factor >= 1, 'auto' (the reference's default) or 'off' "
                        "(the paper's plain knapsack) [auto]")
    p.add_argument("--targets", nargs="*", help="regexes of linear layer names to compress (default: all in decoder blocks)")
    p.add_argument("--ignore", nargs="*", help="regexes of linear layer names to leave dense")
    p.add_argument("--calib", nargs="*", help="calibration .txt/.jsonl files (default: $ROCKETLM_DATA/calib/*)")
    p.add_argument("--calib-dataset", help="HF dataset with a 'text' column (needs network)")
    p.add_argument("--calib-samples", type=int, help=f"calibration windows (default {d.calib_samples})")
    p.add_argument("--seq-len", type=int, help=f"calibration window length in tokens (default {d.calib_seq_len})")
    p.add_argument("--calib-batch-size", type=int, help=f"windows per forward (default {d.calib_batch_size})")
    p.add_argument("--seed", type=int, help=f"calibration sampling seed (default {d.seed})")
    p.add_argument("--grid", help="candidate grid, e.g. 'removed=0.05:0.70:0.05;ks=1.0:3.0:0.5' (default: the reference grid)")
    p.add_argument("--profile-dtype", choices=("float32", "float64"), help="dtype of the per-candidate algebra")
    p.add_argument("--ks-search", choices=KS_SEARCHES,
                   help="auto: per (layer, removed ratio) profile only the ks a descent visits for the run's cost (the "
                        "best ks are exact where the error is unimodal in ks; where not, the ks around its minima are "
                        "scanned); exhaustive: every "
                        f"candidate of the grid (always under --budget-count flops) (default {d.ks_search})")
    p.add_argument("--profile-workers", type=int,
                   help="layers profiled at once in this process, sharing its threads (default: 2 on a CPU with "
                        ">= 2 threads, else 1; 1 in offloaded runs)")
    p.add_argument("--dtype", help="dtype to load the model in (default: the checkpoint's)")
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), help="dtype of the saved tensors")
    p.add_argument("--cache-dir", help="where Grams and profiles are cached (default: $ROCKETLM_CACHE or ~/.cache/rocketlm)")
    p.add_argument("--config", help="JSON file with a RocketConfig; flags given on the command line override it")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                   help="factor each layer with the Gram of its input in the model compressed so far "
                        "(a second, sequential calibration pass) (default: on from --ratio "
                        f"{SEQUENTIAL_AUTO_FROM_REMOVED:g}, in one process with the weights in memory)")
    p.add_argument("--upstream-correction", action=argparse.BooleanOptionalAction,
                   help="with --sequential: fit the dense model's outputs from the compressed inputs, so a layer "
                        "also repairs what earlier layers broke (default: on with --sequential)")
    p.add_argument("--sequential-damping", type=float,
                   help="with --sequential: ridge (x mean Gram diagonal) pulling each refit towards the original "
                        f"weight (default {SEQUENTIAL_AUTO_DAMPING:g} with --sequential)")
    p.add_argument("--sequential-samples", type=int,
                   help="with --sequential: calibration windows (the first N) the sequential pass runs through the "
                        f"model; its time grows with them (default {d.sequential_samples})")
    p.add_argument("--refine-iters", type=int,
                   help=f"alternating closed-form refits of U and of V's kept values (default {d.refine_iters})")
    p.add_argument("--sensitivity-samples", type=int,
                   help=f"calibration windows for the 'fisher' cost's sensitivities (default {d.sensitivity_samples})")
    p.add_argument("--offload", choices=("none", "auto", "cpu", "disk"),
                   help="where the weights stay: disk = safetensors on disk, one decoder block in memory at a time "
                        "(models larger than memory; MODEL must be a local directory); auto = disk when the weights "
                        f"would not fit in free memory (default {d.offload})")
    _add_common(p)


def _ppl_parser(sub) -> None:
    p = sub.add_parser("ppl", help="WikiText-2 perplexity of a dense model or a compressed checkpoint")
    p.add_argument("model", help="checkpoint directory, HF id, model directory, .gguf file, or preset")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--with-dense", action="store_true",
                   help="for a checkpoint: also measure the dense model it was compressed from, on the same windows")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    _add_common(p)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="achieved ratio, bytes on disk, run-time cost and per-layer allocation of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--layers", action="store_true", help="print the per-layer allocation table")
    p.add_argument("--device", default="cpu", help="device whose run-time forms are reported (measured) [cpu]")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help="run-time form to report [auto]")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a dense model or a compressed checkpoint")
    p.add_argument("model", help="checkpoint directory, HF id, model directory, .gguf file, or preset")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_common(p)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed and resident memory, optionally against the dense model")
    p.add_argument("model", help="checkpoint directory, HF id, model directory, .gguf file, or preset")
    p.add_argument("--against", default=None, help="the dense model to compare with (measured in the same process)")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    _add_common(p)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite an older rocketlm checkpoint in place to the current format")
    p.add_argument("checkpoint")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a re-densified standard HF checkpoint (W_hat = U V) for other runtimes")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocketlm", description="Training-free LLM compression with ROCKET")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _ppl_parser(sub)
    _info_parser(sub)
    _export_parser(sub)
    _generate_parser(sub)
    _bench_parser(sub)
    _convert_parser(sub)
    from rocketlm.evaluation.eval_cli import add_eval_parser
    from rocketlm.study.cli import add_study_parser
    from rocketlm.estimation.cli import add_estimate_parser
    add_eval_parser(sub)
    add_study_parser(sub)
    add_estimate_parser(sub)
    return parser


_FLAG_TO_FIELD = {"ratio": "removed_ratio", "cost": "cost", "budget_count": "budget_count", "alpha": "alpha",
                  "targets": "targets", "ignore": "ignore", "calib": "calib_files", "calib_dataset": "calib_dataset",
                  "calib_samples": "calib_samples", "seq_len": "calib_seq_len", "calib_batch_size": "calib_batch_size",
                  "seed": "seed", "profile_dtype": "profile_dtype", "device": "device", "save_dtype": "save_dtype",
                  "sequential": "sequential", "upstream_correction": "upstream_correction",
                  "sequential_damping": "sequential_damping", "sequential_samples": "sequential_samples",
                  "refine_iters": "refine_iters", "sensitivity_samples": "sensitivity_samples",
                  "offload": "offload", "ks_search": "ks_search",
                  "profile_workers": "profile_workers"}


def _config_from_args(args: argparse.Namespace) -> RocketConfig:
    """The config file (if any), overridden by the flags given; ``--ratio`` must come from one of them."""
    base = RocketConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else None
    values = {field: getattr(args, flag) for flag, field in _FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
    values["model"] = args.model
    if args.grid:
        values["grid"] = GridConfig.parse(args.grid)
    if base is None:
        if "removed_ratio" not in values:
            raise ConfigError("--ratio is required (the fraction of parameters to remove, e.g. --ratio 0.5)")
        return RocketConfig(**values)
    return base.replace(**values)


def _cmd_compress(args) -> int:
    from rocketlm.checkpoint.io import save_compressed
    from rocketlm.distributed import init_from_env
    from rocketlm.models.loading import load_model
    from rocketlm.pipeline import compress

    from rocketlm.preflight import check_compress_inputs

    config = _config_from_args(args)
    dist = init_from_env(config.device)  # one process unless started by torchrun
    if not dist.is_main:  # progress bars on rank 0 only
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        with dist.step("checking the inputs"):
            check_compress_inputs(config, args.out, args.data, overwrite=args.overwrite,
                                  world_size=dist.world_size)
        from rocketlm.offload.model import load_offloaded, resolve_offload
        # one choice for every rank (rank 0's), counting the processes of this host that each hold a copy
        offload = dist.on_main(lambda: resolve_offload(config.offload, config.model, config.device,
                                                       processes=dist.local_world_size), "choosing the offload")
        with dist.step("loading the model"):
            if offload == "disk":
                model, tokenizer = load_offloaded(config.model, device=dist.device(config.device), dtype=args.dtype)
            else:
                model, tokenizer = load_model(config.model, device=dist.device(config.device), dtype=args.dtype)
        result = compress(model, tokenizer, config, cache_dir=args.cache_dir, data_dir=args.data,
                          progress=not args.quiet, dist=dist)
        manifest = dist.on_main(lambda: save_compressed(result, args.out), "writing the checkpoint", broadcast=False)
        if dist.is_main:
            _print_summary(manifest)
    finally:
        dist.close()
    return 0


def _print_summary(manifest: dict) -> None:
    alloc = manifest["allocation"]
    on_disk, dense = manifest["weights_file"]["bytes"], manifest["dense_weights_bytes"]
    cfg = manifest["config"]
    flops = alloc.get("achieved_removed_flops_ratio")
    print(f"cost {alloc['cost']}, budget in {alloc['budget_count']}: removed "
          f"{100 * alloc['achieved_removed_ratio']:.2f}% of the targeted parameters (target {100 * cfg['removed_ratio']:.2f}%), "
          f"{100 * alloc['achieved_removed_bytes_ratio']:.2f}% of their bytes"
          + (f", {100 * flops:.2f}% of their multiply-adds per token" if flops is not None else ""))
    n_dense = sum(c["dense"] for c in alloc["choices"])
    cap = "off" if alloc.get("alpha") is None else f"{alloc['alpha']:g}"
    print(f"layers: {len(alloc['choices'])} targeted, {n_dense} left dense; summed cost {alloc['total_cost']:.4f}; "
          f"alpha cap {cap}")
    if cfg.get("sequential"):
        print(f"sequential calibration: on (upstream correction {'on' if cfg.get('upstream_correction') else 'off'}, "
              f"damping {cfg.get('sequential_damping') or 0:g}, "
              f"{RocketConfig.from_dict(cfg).sequential_windows} of {cfg['calib_samples']} windows)")
    print(f"model.safetensors: {on_disk / 1e6:.1f} MB vs dense {dense / 1e6:.1f} MB ({100 * on_disk / dense:.1f}%)")
    for name, st in manifest.get("stages", {}).items():
        print(f"  {name:<12} {st['seconds']:8.1f} s   peak RSS {st['peak_rss_bytes'] / 2**30:.2f} GiB")


def _load_any(model: str, device: str | None, runtime: str = "auto"):
    from rocketlm.checkpoint.io import is_checkpoint, load_compressed
    from rocketlm.models.loading import load_model
    device = device or "cpu"
    if is_checkpoint(model):
        return load_compressed(model, device=device, runtime=runtime)
    return load_model(model, device=device)


def _cmd_ppl(args) -> int:
    from rocketlm.checkpoint.io import is_checkpoint, read_manifest
    from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_text

    models = [args.model]
    if args.with_dense:
        if not is_checkpoint(args.model):
            raise ConfigError(f"--with-dense needs a rocketlm checkpoint; {args.model} is a dense model already")
        models.insert(0, read_manifest(args.model)["config"]["model"])
    text, results = wikitext2_text(args.data), {}
    for name in models:
        model, tokenizer = _load_any(name, args.device or "cpu", args.runtime)
        windows = token_windows(tokenizer, text, args.seq_len)
        result = perplexity(model, windows, limit=args.limit, batch_size=args.batch_size, progress=not args.quiet)
        kind = "compressed" if is_checkpoint(name) else "dense"
        print(f"WikiText-2 perplexity of {name} ({kind}): {result.perplexity:.3f} "
              f"({result.windows}/{result.total_windows} windows of {result.seq_len} tokens, {result.seconds:.0f} s)")
        results[name] = {"model": name, "kind": kind, **result.to_json()}
        del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results[args.model] if len(results) == 1 else list(results.values()),
                                             indent=2))
    return 0


def _cmd_info(args) -> int:
    from rocketlm.checkpoint.io import read_manifest
    import torch
    from rocketlm.allocation.plan import Allocation
    from rocketlm.runtime.report import run_costs

    manifest = read_manifest(args.checkpoint)
    _print_summary(manifest)
    choices = Allocation.from_json(manifest["allocation"]).choices
    costs = run_costs(choices, getattr(torch, manifest.get("torch_dtype", "float32")), args.device, args.runtime)
    forms = {f: sum(c.form == f for c in costs) for f in sorted({c.form for c in costs})}
    flops, dense_flops = sum(c.flops for c in costs), sum(c.dense_flops for c in costs)
    held, dense = sum(c.resident_bytes for c in costs), sum(c.dense_bytes for c in costs)
    print(f"run time on {args.device} ({args.runtime}): forms {forms}; targeted layers {flops / dense_flops:.3f}x the "
          f"dense multiply-adds per token, {held / 1e6:.1f} MB resident vs {dense / 1e6:.1f} MB dense ({held / dense:.3f}x)")
    if args.layers:
        print(f"{'layer':<40} {'removed':>7} {'ks':>5} {'k':>5} {'s':>5} {'err_w':>7} {'err_out':>7} "
              f"{'form':>8} {'flops/dense':>11} {'bytes/dense':>11}")
        for c, r in zip(choices, costs):
            ks = "dense" if c.dense else f"{c.ks:.1f}"
            print(f"{c.name:<40} {c.achieved_removed_ratio:>7.3f} {ks:>5} {c.k or '-':>5} {c.s or '-':>5} "
                  f"{c.error_weight:>7.4f} {c.error_output:>7.4f} {r.form:>8} {r.flops / r.dense_flops:>11.3f} "
                  f"{r.resident_bytes / r.dense_bytes:>11.3f}")
    return 0


def _cmd_export(args) -> int:
    from rocketlm.checkpoint.io import densify, load_compressed
    model, tokenizer = load_compressed(args.checkpoint)
    densify(model)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a dense HF checkpoint to {args.out}")
    return 0


def _cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model, tokenizer = _load_any(args.model, args.device, args.runtime)
    prompt = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else dict(do_sample=False)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=False),
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    return 0


def _cmd_bench(args) -> int:
    import torch
    from rocketlm.runtime.benchmark import compare_speed, memory_figures

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {args.model: _load_any(args.model, args.device, args.runtime)[0]}
    if args.against:
        models[args.against] = _load_any(args.against, args.device, args.runtime)[0]
    targets = _targets_of(args.model) or (_targets_of(args.against) if args.against else None)
    speed = compare_speed(models, runs=args.runs, prefill_tokens=args.prefill_tokens,
                          prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    base = speed.get(args.against) if args.against else None
    base_mem = memory_figures(models[args.against], targets) if args.against else None
    print(f"torch threads {torch.get_num_threads()}, median of {args.runs} runs; prefill 1 x {args.prefill_tokens} "
          f"tokens, decode {args.new_tokens} tokens after a {args.prompt_tokens}-token prompt")
    for name, model in models.items():
        mem, fig = memory_figures(model, targets), speed[name]
        line = (f"{name}: prefill {fig.prefill_tokens_per_s:.0f} tok/s, decode {fig.decode_tokens_per_s:.1f} tok/s, "
                f"weights {mem.resident_weight_bytes / 1e6:.1f} MB (targeted layers {mem.targeted_layers_bytes / 1e6:.1f} MB)")
        if base is not None:
            line += (f"; vs {args.against}: prefill {fig.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f}x, "
                     f"decode {fig.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x, weights "
                     f"{mem.resident_weight_bytes / base_mem.resident_weight_bytes:.2f}x, targeted layers "
                     f"{mem.targeted_layers_bytes / base_mem.targeted_layers_bytes:.2f}x")
        print(line)
    return 0


def _targets_of(model: str) -> list[str] | None:
    from rocketlm.checkpoint.io import is_checkpoint, read_manifest
    if not is_checkpoint(model):
        return None
    return [c["name"] for c in read_manifest(model)["allocation"]["choices"]]


def _cmd_convert(args) -> int:
    from rocketlm.checkpoint.io import convert_checkpoint
    print(convert_checkpoint(args.checkpoint))
    return 0


def _cmd_eval(args) -> int:
    from rocketlm.evaluation.eval_cli import run_eval
    return run_eval(args, _load_any)


def _cmd_study(args) -> int:
    from rocketlm.study.cli import run_study_cli
    return run_study_cli(args)


def _cmd_estimate(args) -> int:
    from rocketlm.estimation.cli import run_estimate_cli
    return run_estimate_cli(args)


COMMANDS = {"compress": _cmd_compress, "ppl": _cmd_ppl, "info": _cmd_info, "export": _cmd_export, "eval": _cmd_eval,
            "study": _cmd_study, "generate": _cmd_generate, "bench": _cmd_bench, "convert": _cmd_convert,
            "estimate": _cmd_estimate}


def main(argv: list[str] | None = None) -> int:
    from rocketlm.distributed import env_rank_tag

    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    rank = env_rank_tag()  # "rank R/W" under a multi-process torchrun launch
    logging.basicConfig(level=logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO),
                        format="%(asctime)s %(levelname)s " + (f"[{rank}] " if rank else "") + "%(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    where = f"rocketlm {args.command}" + (f" [{rank}]" if rank else "")
    try:
        return COMMANDS[args.command](args)
    except RocketError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted; cached calibration and profiles are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
