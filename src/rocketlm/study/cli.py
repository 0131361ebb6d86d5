"""``rocketlm study``: argument parsing and printing only; the work is in :mod:`rocketlm.study.runner`."""
from __future__ import annotations

import argparse
from pathlib import Path

from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.study.runner import DEFAULT_COSTS, DEFAULT_RATIOS, DEFAULT_SEEDS, StudyConfig


def _floats(text: str, flag: str) -> tuple[float, ...]:
    """``"0.2,0.5"`` or ``"START:STOP:STEP"`` (inclusive)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError("step must be > 0")
            return tuple(round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1))
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers or START:STOP:STEP ({exc})") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2023,42") from None


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to an ``argparse`` subparsers object."""
    d = RocketConfig()
    p = subparsers.add_parser(
        "study", help="the allocation-cost study (ActCost paper) on any model: every seed x ratio x cost, "
                      "statistics, figures and a report")
    p.add_argument("model", help="HF hub id, local model directory, .gguf file, or preset (smollm2-135m)")
    p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                   help="removed ratios to compress and evaluate, comma list [%(default)s]")
    p.add_argument("--costs", default=",".join(DEFAULT_COSTS),
                   help="allocation costs to compare, comma list; weight = ROCKET, output = ActCost, "
                        "blend = their midpoint [%(default)s]")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="calibration seeds; one profiling pass each [%(default)s]")
    p.add_argument("--tasks", default="paper",
                   help="zero-shot tasks: paper, all, a comma list, or none for perplexity only [%(default)s]")
    p.add_argument("--limit", type=int, default=None, help="first N documents per zero-shot task [all]")
    p.add_argument("--sweep-ratios", default="0.1:0.6:0.05",
                   help="target ratios of the allocation-only divergence sweep, list or START:STOP:STEP [%(default)s]")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples,
                   help="calibration windows per seed [%(default)s]")
    p.add_argument("--seq-len", type=int, default=d.calib_seq_len, help="calibration window length [%(default)s]")
    p.add_argument("--grid", default=None, help="candidate grid, e.g. 'removed=0.05:0.70:0.05;ks=1.0:3.0:0.1' "
                                                "[the reference grid]")
    p.add_argument("--budget-count", choices=("values", "bytes"), default=d.budget_count,
                   help="count the budget in values (paper) or bytes [%(default)s]")
    p.add_argument("--alpha", default=d.alpha,
                   help="the reference's error cap for every run: a factor >= 1, 'auto' or 'off' [%(default)s]")
    p.add_argument("--ppl-seq-len", type=int, default=2048, help="WikiText-2 window length [%(default)s]")
    p.add_argument("--ppl-limit", type=int, default=None, help="first N WikiText-2 windows [all]")
    p.add_argument("--ppl-batch-size", type=int, default=1,
                   help="WikiText-2 windows per forward (also the bootstrap unit) [%(default)s]")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size [%(default)s]")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples [%(default)s]")
    p.add_argument("--dtype", default=None, help="dtype to load the model in [the checkpoint's]")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda [cpu]")
    p.add_argument("--data", default=None, help="data directory [$ROCKETLM_DATA]")
    p.add_argument("--cache-dir", default=None, help="Grams and profiles cache [$ROCKETLM_CACHE or ~/.cache/rocketlm]")
    p.add_argument("--out", required=True, help="study directory (report.md, study.json, figures/, runs/)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def study_config_from_args(args: argparse.Namespace) -> StudyConfig:
    rocket = RocketConfig(calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                          budget_count=args.budget_count, device=args.device or "cpu", alpha=args.alpha,
                          **({"grid": GridConfig.parse(args.grid)} if args.grid else {}))
    return StudyConfig(
        model=args.model, out=args.out, ratios=_floats(args.ratios, "--ratios"),
        costs=tuple(c.strip() for c in args.costs.split(",") if c.strip()), seeds=_ints(args.seeds, "--seeds"),
        tasks=args.tasks, limit=args.limit, sweep_ratios=_floats(args.sweep_ratios, "--sweep-ratios"),
        ppl_seq_len=args.ppl_seq_len, ppl_limit=args.ppl_limit, ppl_batch_size=args.ppl_batch_size,
        batch_size=args.batch_size, data_dir=args.data, cache_dir=args.cache_dir, dtype=args.dtype,
        n_boot=args.n_boot, rocket=rocket)


def run_study_cli(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments; prints the main table and where the report is."""
    from rocketlm.study.report import format_main_table
    from rocketlm.study.runner import run_study

    config = study_config_from_args(args)
    study = run_study(config, progress=not args.quiet)
    print(format_main_table(study))
    for row in study.get("paper_comparison", []):
        print(f"- {row['claim']}: {row['study']} -> {row['verdict']}")
    print(f"report: {Path(config.out) / 'report.md'}")
    return 0
