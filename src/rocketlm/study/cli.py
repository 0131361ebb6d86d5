"""``rocketlm study``: argument parsing and printing only; the work is in :mod:`rocketlm.study.runner`.

Every default comes from :class:`~rocketlm.study.config.StudyConfig` (and its ``rocket``
:class:`~rocketlm.config.RocketConfig`): a flag left out is ``None`` here and the dataclass fills it in.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rocketlm.config import BUDGET_COUNTS, GridConfig, parse_values
from rocketlm.errors import ConfigError
from rocketlm.study.config import StudyConfig


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2023,42") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _show(values: Sequence) -> str:
    """A default list as the user would type it: ``START:STOP:STEP`` when evenly spaced, else a comma list."""
    if len(values) > 2 and all(isinstance(v, float) for v in values):
        step = round(values[1] - values[0], 6)
        if step > 0 and all(abs((b - a) - step) < 1e-9 for a, b in zip(values, values[1:])):
            return f"{values[0]:g}:{values[-1]:g}:{step:g}"
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _defaults() -> StudyConfig:
    """The study's defaults (model and out are placeholders)."""
    return StudyConfig(model="", out="")


def _add_run_arguments(p: argparse.ArgumentParser, d: StudyConfig) -> None:
    """What is studied: ratios, costs, seeds, tasks, sweep and the compression settings."""
    p.add_argument("--ratios", help=f"removed ratios to compress and evaluate, list or START:STOP:STEP "
                                    f"[{_show(d.ratios)}]")
    p.add_argument("--costs", help="allocation costs to compare, comma list; weight = ROCKET, output = ActCost, "
                                   f"blend = their midpoint [{_show(d.costs)}]")
    p.add_argument("--seeds", help=f"calibration seeds; one profiling pass each [{_show(d.seeds)}]")
    p.add_argument("--tasks", help="zero-shot tasks: paper, all, a comma list, or none for perplexity only "
                                   f"[{d.tasks}]")
    p.add_argument("--limit", type=int, help="first N documents per zero-shot task [all]")
    p.add_argument("--sweep-ratios", help="target ratios of the allocation-only divergence sweep, list or "
                                          f"START:STOP:STEP [{_show(d.sweep_ratios)}]")
    p.add_argument("--calib-samples", type=int, help=f"calibration windows per seed [{d.rocket.calib_samples}]")
    p.add_argument("--seq-len", type=int, help=f"calibration window length [{d.rocket.calib_seq_len}]")
    p.add_argument("--grid", help="candidate grid, e.g. 'removed=0.05:0.70:0.05;ks=1.0:3.0:0.1' [the reference grid]")
    p.add_argument("--budget-count", choices=BUDGET_COUNTS,
                   help=f"what the removed budget counts (values: as in the paper) [{d.rocket.budget_count}]")
    p.add_argument("--alpha", help="the reference's error cap for every run: a factor >= 1, 'auto' or 'off' "
                                   f"[{d.rocket.alpha}]")


def _add_eval_arguments(p: argparse.ArgumentParser, d: StudyConfig) -> None:
    """How the models are evaluated and where things are."""
    p.add_argument("--ppl-seq-len", type=int, help=f"WikiText-2 window length [{d.ppl_seq_len}]")
    p.add_argument("--ppl-limit", type=int, help="first N WikiText-2 windows [all]")
    p.add_argument("--ppl-batch-size", type=int,
                   help=f"WikiText-2 windows per forward (also the bootstrap unit) [{d.ppl_batch_size}]")
    p.add_argument("--batch-size", type=int, help=f"zero-shot batch size [{d.batch_size}]")
    p.add_argument("--n-boot", type=int, help=f"bootstrap resamples [{d.n_boot}]")
    p.add_argument("--confidence", type=float, help=f"confidence level of the bootstrap intervals [{d.confidence}]")
    p.add_argument("--dtype", help="dtype to load the model in [the checkpoint's]")
    p.add_argument("--device", help=f"torch device, e.g. cpu, cuda [{d.rocket.device}]")
    p.add_argument("--data", help="data directory [$ROCKETLM_DATA]")
    p.add_argument("--cache-dir", help="Grams and profiles cache [$ROCKETLM_CACHE or ~/.cache/rocketlm]")


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "study", help="the allocation-cost study (ActCost paper) on any model: every seed x ratio x cost, "
                      "statistics, figures and a report")
    p.add_argument("model", help="HF hub id, local model directory, .gguf file, or preset (smollm2-135m)")
    d = _defaults()
    _add_run_arguments(p, d)
    _add_eval_arguments(p, d)
    p.add_argument("--out", required=True, help="study directory (report.md, study.json, figures/, runs/)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def study_config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of the given flags; the ones left out keep the dataclass defaults."""
    a = args
    config = StudyConfig(model=a.model, out=a.out, **_given(
        ratios=a.ratios and parse_values(a.ratios, what="--ratios"), costs=a.costs and _names(a.costs),
        seeds=a.seeds and _ints(a.seeds, "--seeds"), tasks=a.tasks, limit=a.limit,
        sweep_ratios=a.sweep_ratios and parse_values(a.sweep_ratios, what="--sweep-ratios"),
        ppl_seq_len=a.ppl_seq_len, ppl_limit=a.ppl_limit, ppl_batch_size=a.ppl_batch_size, batch_size=a.batch_size,
        data_dir=a.data, cache_dir=a.cache_dir, dtype=a.dtype, n_boot=a.n_boot, confidence=a.confidence))
    rocket = _given(calib_samples=a.calib_samples, calib_seq_len=a.seq_len, budget_count=a.budget_count,
                    alpha=a.alpha, device=a.device, grid=a.grid and GridConfig.parse(a.grid))
    return dataclasses.replace(config, rocket=config.rocket.replace(**rocket)) if rocket else config


def run_study_cli(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments; prints the main table and where the report is."""
    from rocketlm.study.report import format_main_table
    from rocketlm.study.runner import run_study

    config = study_config_from_args(args)
    study = run_study(config, progress=not args.quiet)
    print(format_main_table(study))
    for claim in study.paper_comparison:
        print(f"- {claim.claim}: {claim.study} -> {claim.verdict}")
    print(f"report: {Path(config.out) / 'report.md'}")
    return 0
