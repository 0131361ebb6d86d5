"""``rocketlm estimate``: argument parsing and printing only; the work is in :func:`estimate`.

It takes the flags of ``rocketlm compress`` (a compress command line with ``compress`` replaced by
``estimate`` works; ``--ratio`` is optional here), plus how many processes and how to probe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rocketlm.config import BUDGET_COUNTS, SEQUENTIAL_AUTO_FROM_REMOVED, GridConfig, RocketConfig
from rocketlm.errors import ConfigError
from rocketlm.estimation.estimate import H100, EstimateOptions, TargetDevice

# compress flag -> RocketConfig field (the flags that change what a run costs, or are carried along)
_FIELDS = {"ratio": "removed_ratio", "cost": "cost", "budget_count": "budget_count", "alpha": "alpha",
           "targets": "targets", "ignore": "ignore", "calib_samples": "calib_samples", "seq_len": "calib_seq_len",
           "calib_batch_size": "calib_batch_size", "seed": "seed", "profile_dtype": "profile_dtype",
           "device": "device", "save_dtype": "save_dtype", "calib": "calib_files", "calib_dataset": "calib_dataset",
           "ks_search": "ks_search", "sequential": "sequential", "upstream_correction": "upstream_correction",
           "sequential_samples": "sequential_samples", "refine_iters": "refine_iters",
           "sensitivity_samples": "sensitivity_samples", "offload": "offload"}


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    d = RocketConfig()
    p.add_argument("--ratio", type=float, help=f"fraction of the targeted parameters to remove [{d.removed_ratio}]")
    p.add_argument("--cost", help=f"allocation cost [{d.cost}]")
    p.add_argument("--budget-count", choices=BUDGET_COUNTS, help=f"what the budget counts [{d.budget_count}]")
    p.add_argument("--alpha", help=f"the reference's error cap: a factor >= 1, 'auto' or 'off' [{d.alpha}]")
    p.add_argument("--targets", nargs="*", help="regexes of linear layer names to compress [all in decoder blocks]")
    p.add_argument("--ignore", nargs="*", help="regexes of linear layer names to leave dense")
    p.add_argument("--calib-samples", type=int, help=f"calibration windows [{d.calib_samples}]")
    p.add_argument("--seq-len", type=int, help=f"calibration window length in tokens [{d.calib_seq_len}]")
    p.add_argument("--calib-batch-size", type=int, help=f"windows per forward [{d.calib_batch_size}]")
    p.add_argument("--grid", help="candidate grid, e.g. 'removed=0.05:0.70:0.05;ks=1.0:3.0:0.5' [the reference grid]")
    p.add_argument("--profile-dtype", choices=("float32", "float64"), help="dtype of the per-candidate algebra")
    p.add_argument("--ks-search", choices=("auto", "exhaustive"), help="candidates profiled per (layer, ratio)")
    p.add_argument("--refine-iters", type=int, help=f"alternating refits per compressed layer [{d.refine_iters}]")
    p.add_argument("--sensitivity-samples", type=int,
                   help=f"windows of the fisher cost's sensitivity pass [{d.sensitivity_samples}]")
    p.add_argument("--dtype", help="dtype the model would be loaded in [its config's]")
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), help="dtype of the saved tensors")
    p.add_argument("--device", help="device to time on, e.g. cpu, cuda [cpu]")
    p.add_argument("--cache-dir", help="where the Gram cache would be written (its disk is timed) [a temp dir]")
    p.add_argument("--config", help="JSON file with a RocketConfig; flags override it")
    p.add_argument("--calib", nargs="*", help="calibration .txt/.jsonl files (their reading is timed) "
                                              "[$ROCKETLM_DATA/calib/*]")
    p.add_argument("--calib-dataset", help="HF dataset with a 'text' column (its reading is not timed)")
    p.add_argument("--data", help="data directory [$ROCKETLM_DATA]")
    p.add_argument("--runtime", help=argparse.SUPPRESS)  # accepted as in compress, no cost effect
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                   help="the sequential calibration pass of the compression stage (timed on the probe block; "
                        f"default: as compress decides, on from --ratio {SEQUENTIAL_AUTO_FROM_REMOVED:g} in one "
                        "process)")
    p.add_argument("--upstream-correction", action=argparse.BooleanOptionalAction,
                   help="with --sequential: its dense stream and cross-Grams")
    p.add_argument("--sequential-damping", type=float, help=argparse.SUPPRESS)  # accepted as in compress, no cost effect
    p.add_argument("--sequential-samples", type=int,
                   help="with --sequential: calibration windows the sequential pass runs "
                        f"[{RocketConfig().sequential_samples}]")
    # accepted as in compress, not modelled (the output says so when one is set)
    p.add_argument("--offload", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)


def _add_probe_arguments(p: argparse.ArgumentParser) -> None:
    o = EstimateOptions()
    p.add_argument("--nproc", type=int, default=o.nproc,
                   help="processes (torchrun), each on a device like this one: calibration data-parallel, "
                        f"profiling and compression layer-parallel [{o.nproc}]")
    p.add_argument("--link-gbps", type=float, default=o.link_gbps,
                   help=f"all_reduce bandwidth between processes, GB/s [{o.link_gbps:g}]")
    p.add_argument("--max-probe-dim", type=int, default=o.max_probe_dim,
                   help=f"layers wider than this are timed scaled down (times x f^3) [{o.max_probe_dim}]")
    p.add_argument("--max-probe-tokens", type=int, default=o.max_probe_tokens,
                   help=f"tokens of the calibration probe batch at most [{o.max_probe_tokens}]")
    p.add_argument("--probe-seconds", type=float, default=o.probe_seconds,
                   help="a layer shape is timed at the largest size (from 512, doubling) whose profile_layer is "
                        f"predicted under this [{o.probe_seconds:g}]")
    p.add_argument("--repeats", type=int, default=o.repeats, help=f"timed repeats per probe (median) [{o.repeats}]")
    p.add_argument("--clock", choices=("wall", "cpu"), default=o.clock,
                   help="time the probes in wall seconds, or in CPU seconds (with OMP_NUM_THREADS=1: the time on an "
                        f"idle machine, whatever the load now) [{o.clock}]")
    p.add_argument("--target", help="also project onto another device: 'h100', or "
                                    "'NAME:float64=T,float32=T,bfloat16=T' with peak TFLOP/s per dtype")
    p.add_argument("--target-efficiency", type=float, default=0.5,
                   help="share of the target's peak GEMM rate reached [0.5]")
    p.add_argument("--shapes", action="store_true", help="also print the per layer shape timings")
    p.add_argument("--out", help="write the estimate as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")


def add_estimate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``estimate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("estimate", help="projected time and peak memory of each compression stage, from "
                                               "the model's config and kernels timed here (no weights read)")
    p.add_argument("model", help="HF hub id, model directory, config.json file, .gguf file, or preset")
    _add_run_arguments(p)
    _add_probe_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> RocketConfig:
    """The :class:`RocketConfig` of the run to estimate: ``--config`` (if any) overridden by the flags."""
    base = RocketConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else RocketConfig()
    known = {f.name for f in dataclasses.fields(RocketConfig)}
    values = {field: getattr(args, flag) for flag, field in _FIELDS.items()
              if getattr(args, flag) is not None and field in known}
    values["model"] = args.model
    if args.grid:
        values["grid"] = GridConfig.parse(args.grid)
    return base.replace(**values)


def parse_target(text: str, efficiency: float) -> TargetDevice:
    """``h100`` or ``NAME:dtype=TFLOPS,...``."""
    if text.lower() == "h100":
        return TargetDevice(H100.name, H100.tflops, efficiency)
    name, _, rates = text.partition(":")
    try:
        tflops = {k.strip(): float(v) for k, v in (item.split("=") for item in rates.split(",") if item.strip())}
    except ValueError:
        tflops = {}
    if not name or not tflops:
        raise ConfigError(f"--target {text!r}: expected 'h100' or 'NAME:float64=67,float32=67,bfloat16=989'")
    return TargetDevice(name, tflops, efficiency)


def options_from_args(args: argparse.Namespace) -> EstimateOptions:
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: must be >= 1")
    return EstimateOptions(nproc=args.nproc, dtype=args.dtype, cache_dir=args.cache_dir, data_dir=args.data,
                           max_probe_dim=args.max_probe_dim, max_probe_tokens=args.max_probe_tokens,
                           probe_seconds=args.probe_seconds,
                           link_gbps=args.link_gbps, repeats=args.repeats, clock=args.clock)


def run_estimate_cli(args: argparse.Namespace) -> int:
    """Estimate from parsed arguments; prints the table, writes ``--out`` JSON."""
    from rocketlm.estimation.estimate import estimate, project_to_device
    from rocketlm.estimation.report import format_estimate

    config = config_from_args(args)
    target = parse_target(args.target, args.target_efficiency) if args.target else None
    result = estimate(args.model, config, options_from_args(args))
    projected = project_to_device(result, target) if target else None
    print(format_estimate(result, projected, shapes=args.shapes))
    if args.out:
        data = result.to_json()
        if projected is not None:
            data["target"] = projected.to_json()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=2, default=str))
        print(f"written: {args.out}")
    return 0
