"""Orchestration of the allocation-cost study: one command, every (seed, ratio, cost), resumable.

For every seed the first :func:`rocketlm.pipeline.compress` call computes the calibration
Grams and the profiles (both errors of every candidate, in one pass); every later call of
that seed (other costs, other ratios) finds them in the cache and only allocates and
compresses. Each compressed model is evaluated (WikiText-2 perplexity, the zero-shot suite)
and written as ``<out>/runs/<run>.json`` at once; a rerun skips runs whose JSON exists with
the same settings. Then the divergence analysis, the allocation-only sweep, the statistics,
``<out>/study.json``, the figures and ``<out>/report.md``.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.costs import get_cost
from rocketlm.allocation.plan import Allocation
from rocketlm.calibration.data import DataError, data_dir
from rocketlm.config import ConfigError
from rocketlm.evaluation.perplexity import WIKITEXT_TEST, perplexity, token_windows, wikitext2_text
from rocketlm.evaluation.zeroshot.runner import remove_request_cache, request_cache_path
from rocketlm.pipeline import compress
from rocketlm.profiling.profile import LayerProfile
from rocketlm.storage import write_json_atomic, write_text_atomic
from rocketlm.study import analysis, compare
from rocketlm.study.config import StudyConfig
from rocketlm.study.records import DenseRecord, Evaluation, PerplexityEval, RunRecord, ZeroShotEval, run_name
from rocketlm.study.result import StudyResult

log = logging.getLogger(__name__)

_IGNORED_IN_SPEC = ("device",)  # may change between a run and its resume without changing results


# --------------------------------------------------------------------------- files

def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, indent=1)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _as_json(data: dict) -> dict:
    """``data`` as it reads back from a JSON file (tuples become lists, paths strings)."""
    return json.loads(json.dumps(data, default=str))


def _comparable(spec: dict) -> dict:
    """The run spec as compared on resume (JSON round trip, device-independent)."""
    spec = _as_json(spec)
    for key in _IGNORED_IN_SPEC:
        spec.get("rocket", {}).pop(key, None)
    return spec


def _cached(path: Path, spec: dict) -> dict | None:
    """The JSON of a finished run written with the same settings, else None."""
    record = _read_json(path)
    if record is not None and _comparable(record.get("spec", {})) == _comparable(spec):
        return record
    if record is not None:
        log.warning("%s was written with other settings; recomputing it", path)
    return None


def save_profiles(path: Path, profiles: list[LayerProfile]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(p.to_json()) + "\n" for p in profiles))


def load_profiles(path: Path) -> list[LayerProfile] | None:
    if not path.is_file():
        return None
    return [LayerProfile.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def check_inputs(config: StudyConfig) -> None:
    """Fail before any model work when a package or a data file the study needs is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("the study draws its figures with matplotlib: pip install 'rocketlm[study]' "
                          "(or pip install matplotlib)")
    wikitext = data_dir(config.data_dir) / WIKITEXT_TEST
    if not wikitext.is_file():
        raise DataError(f"WikiText-2 test file {wikitext} not found; pass --data DIR (or set $ROCKETLM_DATA) "
                        f"with {WIKITEXT_TEST} inside")
    if not config.task_names:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("zero-shot tasks need lm-evaluation-harness: pip install 'rocketlm[eval]', "
                          "or run the study with --tasks none (perplexity only)")
    from rocketlm.evaluation.zeroshot.data import MissingDataError, check_files, resolve_data_dir
    from rocketlm.evaluation.zeroshot.tasks import TASKS
    try:
        zdir = resolve_data_dir(config.data_dir)
        for name in config.task_names:
            if TASKS[name].local:
                check_files(name, zdir)
    except MissingDataError as exc:
        raise DataError(str(exc)) from None


# --------------------------------------------------------------------------- evaluation

def perplexity_units(model, windows: torch.Tensor, *, limit: int | None, batch_size: int,
                     progress: bool) -> PerplexityEval:
    """WikiText-2 perplexity (the :func:`perplexity` protocol) plus the mean NLL of every unit of
    ``batch_size`` windows, for the paired bootstrap over windows."""
    use = windows[:limit] if limit else windows
    unit_nll, unit_tokens, seconds = [], [], 0.0
    for i in tqdm(range(0, use.shape[0], batch_size), desc="perplexity", disable=not progress):
        part = perplexity(model, use[i: i + batch_size], batch_size=batch_size, progress=False)
        unit_nll.append(part.mean_nll)
        unit_tokens.append(part.tokens)
        seconds += part.seconds
    tokens = sum(unit_tokens)
    mean_nll = sum(n * t for n, t in zip(unit_nll, unit_tokens)) / tokens
    return PerplexityEval(perplexity=math.exp(mean_nll), mean_nll=mean_nll, windows=int(use.shape[0]),
                          total_windows=int(windows.shape[0]), seq_len=int(use.shape[1]), tokens=tokens,
                          seconds=seconds, unit_windows=batch_size, unit_nll=tuple(unit_nll),
                          unit_tokens=tuple(unit_tokens))


def evaluate_model(model, tokenizer, config: StudyConfig, windows: torch.Tensor, progress: bool,
                   request_cache: Path | None = None) -> Evaluation:
    """Perplexity and (unless tasks are "none") the zero-shot suite.
    ``request_cache``: SQLite file of answered zero-shot requests (an interrupted run resumes)."""
    start = time.perf_counter()
    ppl = perplexity_units(model, windows, limit=config.ppl_limit, batch_size=config.ppl_batch_size,
                           progress=progress)
    ppl_seconds = time.perf_counter() - start
    if not config.task_names:
        return Evaluation(ppl, None, ppl_seconds)
    from rocketlm.evaluation.zeroshot import evaluate_zeroshot
    start = time.perf_counter()
    zeroshot = evaluate_zeroshot(model, tokenizer, config.task_names, data_dir=config.data_dir,
                                 limit=config.limit, batch_size=config.batch_size, progress=progress,
                                 request_cache=request_cache)
    return Evaluation(ppl, ZeroShotEval.from_json(zeroshot), ppl_seconds, time.perf_counter() - start)


# --------------------------------------------------------------------------- the study

class Study:
    """Holds the dense model and runs / loads every piece of the study; :meth:`run` does it all."""

    def __init__(self, config: StudyConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self._model = None
        self._tokenizer = None
        self._windows = None
        self.first_profiles: list[LayerProfile] = []

    # lazily loaded: a fully resumed study never loads the model
    def _ensure_model(self):
        if self._model is None:
            from rocketlm.models.loading import load_model
            self._model, self._tokenizer = load_model(self.config.model, device=self.config.rocket.device,
                                                      dtype=self.config.dtype)
            text = wikitext2_text(self.config.data_dir)
            self._windows = token_windows(self._tokenizer, text, self.config.ppl_seq_len)
        return self._model, self._tokenizer

    def _evaluate(self, model, path: Path) -> Evaluation:
        _, tokenizer = self._ensure_model()
        return evaluate_model(model, tokenizer, self.config, self._windows, self.progress, request_cache_path(path))

    def _compress(self, seed: int, ratio: float, cost: str):
        model, tokenizer = self._ensure_model()
        return compress(copy.deepcopy(model), tokenizer, self.config.run_config(seed, ratio, cost),
                        cache_dir=self.config.cache_dir, data_dir=self.config.data_dir, progress=self.progress)

    def dense_record(self) -> DenseRecord:
        path = self.out / "runs" / "dense.json"
        spec = _as_json({"model": self.config.model, "eval": self.config.eval_spec()})
        cached = _cached(path, spec)
        if cached is not None:
            return DenseRecord.from_json(cached)
        model, _ = self._ensure_model()
        log.info("study: evaluating the dense model")
        start = time.perf_counter()
        evaluation = self._evaluate(model, path)
        record = DenseRecord(spec, self.config.model, evaluation, time.perf_counter() - start)
        _write_json(path, record.to_json())
        remove_request_cache(request_cache_path(path))
        return record

    def run_record(self, seed: int, ratio: float, cost: str) -> tuple[RunRecord, list[LayerProfile] | None]:
        """The run's record (cached or computed) and, when computed, the profiles it used."""
        rocket = self.config.run_config(seed, ratio, cost)
        spec = _as_json({"rocket": rocket.to_dict(), "eval": self.config.eval_spec()})
        path = self.out / "runs" / f"{run_name(seed, ratio, cost)}.json"
        cached = _cached(path, spec)
        if cached is not None:
            log.info("study: %s already done (%s)", run_name(seed, ratio, cost), path)
            return RunRecord.from_json(cached), None
        self._ensure_model()
        start = time.perf_counter()
        result = self._compress(seed, ratio, cost)
        evaluation = self._evaluate(result.model, path)
        record = RunRecord(spec=spec, seed=seed, ratio=ratio, cost=cost, allocation=result.allocation,
                           stages=dict(result.stats), keys=result.keys, checks=_as_json(result.checks),
                           evaluation=evaluation, wall_seconds=time.perf_counter() - start)
        _write_json(path, record.to_json())
        remove_request_cache(request_cache_path(path))
        del result.model
        return record, result.profiles

    def profiles(self, seed: int, fresh: list[LayerProfile] | None) -> list[LayerProfile]:
        path = self.out / "profiles" / f"seed{seed}.jsonl"
        if fresh is not None:
            save_profiles(path, fresh)
            return fresh
        loaded = load_profiles(path)
        if loaded is not None:
            return loaded
        # every run of this seed was resumed but the profile file is gone: one cached compress call recovers it
        result = self._compress(seed, self.config.ratios[0], self.config.costs[0])
        save_profiles(path, result.profiles)
        return result.profiles

    def _run_seed(self, seed: int, runs: list[RunRecord], total: int) -> list[LayerProfile]:
        """Every (ratio, cost) of ``seed``, appended to ``runs``; returns the seed's profiles."""
        fresh = None
        for ratio in self.config.ratios:
            for cost in self.config.costs:
                log.info("study: run %d/%d: seed %d, removed ratio %g, cost %s", len(runs) + 1, total, seed,
                         ratio, cost)
                record, profiles = self.run_record(seed, ratio, cost)
                fresh = fresh or profiles
                runs.append(record)
        return self.profiles(seed, fresh)

    def run(self) -> StudyResult:
        cfg = self.config
        check_inputs(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        total = len(cfg.seeds) * len(cfg.ratios) * len(cfg.costs)
        dense = self.dense_record()
        runs: list[RunRecord] = []
        divergence: dict[int, analysis.SeedDivergence] = {}
        sweep: dict[int, list[analysis.SweepPoint]] = {}
        for seed in cfg.seeds:
            profiles = self._run_seed(seed, runs, total)
            allocations: dict[float, dict[str, Allocation]] = {}
            for r in runs:
                if r.seed == seed:
                    allocations.setdefault(r.ratio, {})[r.cost] = r.allocation
            divergence[seed] = analysis.divergence_analysis(profiles, allocations, cfg.costs)
            sweep[seed] = analysis.allocation_sweep(profiles, cfg.sweep_ratios, cfg.costs,
                                                    budget_count=cfg.rocket.budget_count, alpha=cfg.rocket.alpha)
            if seed == cfg.seeds[0]:
                self.first_profiles = profiles
        study = self.assemble(dense, runs, divergence, sweep)
        self.write(study)
        return study

    def assemble(self, dense: DenseRecord, runs: list[RunRecord], divergence: dict[int, analysis.SeedDivergence],
                 sweep: dict[int, list[analysis.SweepPoint]]) -> StudyResult:
        cfg = self.config
        return StudyResult(
            config=cfg, cost_descriptions={c: get_cost(c).description for c in cfg.costs},
            reference_cost=compare.reference_cost(cfg.costs), dense=dense, runs=runs,
            layers=[p.name for p in self.first_profiles], main_table=compare.main_table(runs, dense, cfg.costs),
            statistics=compare.paired_statistics(runs, cfg.costs, n_boot=cfg.n_boot, confidence=cfg.confidence),
            divergence=divergence, sweep=sweep, runtime=compare.runtime_summary(runs, cfg.costs, sweep))

    def write(self, study: StudyResult) -> None:
        from rocketlm.study import figures, report
        study.figures = figures.make_figures(study, self.first_profiles, self.out / "figures")
        study.paper_comparison = report.paper_comparison(study)
        _write_json(self.out / "study.json", study.to_json())
        write_text_atomic(self.out / "report.md", report.render_report(study))
        log.info("study: wrote %s and %s", self.out / "report.md", self.out / "study.json")


def run_study(config: StudyConfig, progress: bool = True) -> StudyResult:
    """Run (or resume) the whole study and write ``report.md``, ``study.json`` and the figures under ``config.out``."""
    return Study(config, progress).run()
