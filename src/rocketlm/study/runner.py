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
import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.costs import available_costs, get_cost
from rocketlm.allocation.plan import Allocation
from rocketlm.calibration.data import DataError, data_dir
from rocketlm.config import ConfigError, RocketConfig
from rocketlm.evaluation.perplexity import WIKITEXT_TEST, perplexity, token_windows, wikitext2_text
from rocketlm.evaluation.zeroshot.runner import remove_request_cache, request_cache_path
from rocketlm.pipeline import compress
from rocketlm.profiling.profile import LayerProfile
from rocketlm.study import analysis, compare

log = logging.getLogger(__name__)

FORMAT = "rocketlm-study/1"
DEFAULT_COSTS = ("weight", "output", "blend")
DEFAULT_SEEDS = (2023, 42)
DEFAULT_RATIOS = (0.2, 0.5)
DEFAULT_SWEEP = tuple(round(0.1 + 0.05 * i, 2) for i in range(11))  # 0.10 .. 0.60
NO_TASKS = "none"
_IGNORED_IN_SPEC = ("device",)  # may change between a run and its resume without changing results


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs. ``rocket`` carries the compression settings shared by every run
    (calibration size, grid, device, ...); its model / removed_ratio / cost / seed are set per run."""

    model: str
    out: str
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    costs: tuple[str, ...] = DEFAULT_COSTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    tasks: str = "paper"  # zero-shot task spec (see resolve_tasks) or "none"
    limit: int | None = None  # documents per zero-shot task
    sweep_ratios: tuple[float, ...] = DEFAULT_SWEEP
    ppl_seq_len: int = 2048
    ppl_limit: int | None = None  # windows
    ppl_batch_size: int = 1  # also the unit of the perplexity bootstrap (batches of windows)
    batch_size: int = 8  # zero-shot batch size
    data_dir: str | None = None
    cache_dir: str | None = None
    dtype: str | None = None  # dtype to load the model in
    n_boot: int = 2000
    confidence: float = 0.95
    rocket: RocketConfig = field(default_factory=RocketConfig)

    def __post_init__(self) -> None:
        for name in ("ratios", "costs", "seeds", "sweep_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "ratios", tuple(sorted({float(r) for r in self.ratios})))
        object.__setattr__(self, "sweep_ratios", tuple(sorted({float(r) for r in self.sweep_ratios})))
        if not self.ratios or not self.costs or not self.seeds:
            raise ConfigError("study: --ratios, --costs and --seeds each need at least one value")
        for r in self.ratios + self.sweep_ratios:
            if not 0.0 < r < 1.0:
                raise ConfigError(f"study: ratio {r} is outside (0, 1); ratios are removed fractions, e.g. 0.2,0.5")
        unknown = [c for c in self.costs if c not in available_costs()]
        if unknown or len(set(self.costs)) != len(self.costs):
            raise ConfigError(f"study: --costs {','.join(self.costs)}: use distinct names from "
                              f"{', '.join(available_costs())}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study: --seeds {self.seeds} has duplicates")
        for name in ("ppl_seq_len", "ppl_batch_size", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ConfigError(f"study: {name}={getattr(self, name)} must be >= 1")
        for name in ("limit", "ppl_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"study: {name}={getattr(self, name)} must be >= 1 (or left out for all)")
        self.task_names  # validates the spec

    @property
    def task_names(self) -> list[str]:
        if self.tasks.strip().lower() == NO_TASKS:
            return []
        from rocketlm.evaluation.zeroshot.tasks import resolve_tasks
        try:
            return resolve_tasks(self.tasks)
        except ValueError as exc:
            raise ConfigError(f"study: --tasks: {exc}; or 'none' for perplexity only") from None

    def run_config(self, seed: int, ratio: float, cost: str) -> RocketConfig:
        return self.rocket.replace(model=self.model, seed=seed, removed_ratio=ratio, cost=cost)

    def eval_spec(self) -> dict:
        return {"tasks": self.task_names, "limit": self.limit, "ppl_seq_len": self.ppl_seq_len,
                "ppl_limit": self.ppl_limit, "ppl_batch_size": self.ppl_batch_size, "dtype": self.dtype}

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["rocket"] = self.rocket.to_dict()
        data["task_names"] = self.task_names
        return data


# --------------------------------------------------------------------------- files

def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _comparable(spec: dict) -> dict:
    """The run spec as compared on resume (JSON round trip, device-independent)."""
    spec = json.loads(json.dumps(spec, default=str))
    for key in _IGNORED_IN_SPEC:
        spec.get("rocket", {}).pop(key, None)
    return spec


def run_name(seed: int, ratio: float, cost: str) -> str:
    return f"seed{seed}_r{ratio:.3f}_{cost}"


def _cached(path: Path, spec: dict) -> dict | None:
    record = _read_json(path)
    if record is not None and _comparable(record.get("spec", {})) == _comparable(spec):
        return record
    if record is not None:
        log.warning("%s was written with other settings; recomputing it", path)
    return None


def save_profiles(path: Path, profiles: list[LayerProfile]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p.to_json()) + "\n" for p in profiles))
    os.replace(tmp, path)


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
                     progress: bool) -> dict:
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
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "windows": int(use.shape[0]),
            "total_windows": int(windows.shape[0]), "seq_len": int(use.shape[1]), "tokens": tokens,
            "seconds": seconds, "unit_windows": batch_size, "unit_nll": unit_nll, "unit_tokens": unit_tokens}


def evaluate_model(model, tokenizer, config: StudyConfig, windows: torch.Tensor, progress: bool,
                   request_cache: Path | None = None) -> dict:
    """Perplexity and (unless tasks are "none") the zero-shot suite; returns the record fields.
    ``request_cache``: SQLite file of answered zero-shot requests (an interrupted run resumes)."""
    start = time.perf_counter()
    ppl = perplexity_units(model, windows, limit=config.ppl_limit, batch_size=config.ppl_batch_size,
                           progress=progress)
    seconds = {"perplexity": time.perf_counter() - start, "zeroshot": None}
    zeroshot = None
    if config.task_names:
        from rocketlm.evaluation.zeroshot import evaluate_zeroshot
        start = time.perf_counter()
        zeroshot = evaluate_zeroshot(model, tokenizer, config.task_names, data_dir=config.data_dir,
                                     limit=config.limit, batch_size=config.batch_size, progress=progress,
                                     request_cache=request_cache)
        seconds["zeroshot"] = time.perf_counter() - start
    return {"ppl": ppl, "zeroshot": zeroshot, "eval_seconds": seconds}


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

    def dense_record(self) -> dict:
        path = self.out / "runs" / "dense.json"
        spec = {"model": self.config.model, "eval": self.config.eval_spec()}
        record = _cached(path, spec)
        if record is None:
            model, tokenizer = self._ensure_model()
            log.info("study: evaluating the dense model")
            start = time.perf_counter()
            record = {"spec": spec, "model": self.config.model,
                      **evaluate_model(model, tokenizer, self.config, self._windows, self.progress,
                                       request_cache_path(path))}
            record["wall_seconds"] = time.perf_counter() - start
            _write_json(path, record)
            remove_request_cache(request_cache_path(path))
        return record

    def run_record(self, seed: int, ratio: float, cost: str) -> tuple[dict, list[LayerProfile] | None]:
        """The run's record (cached or computed) and, when computed, the profiles it used."""
        rocket = self.config.run_config(seed, ratio, cost)
        spec = {"rocket": rocket.to_dict(), "eval": self.config.eval_spec()}
        path = self.out / "runs" / f"{run_name(seed, ratio, cost)}.json"
        record = _cached(path, spec)
        if record is not None:
            log.info("study: %s already done (%s)", run_name(seed, ratio, cost), path)
            return record, None
        model, tokenizer = self._ensure_model()
        start = time.perf_counter()
        result = compress(copy.deepcopy(model), tokenizer, rocket, cache_dir=self.config.cache_dir,
                          data_dir=self.config.data_dir, progress=self.progress)
        record = {"spec": spec, "seed": seed, "ratio": ratio, "cost": cost,
                  "allocation": result.allocation.to_json(),
                  "stages": {name: st.to_json() for name, st in result.stats.items()},
                  "keys": dataclasses.asdict(result.keys) if result.keys else None,
                  "checks": result.checks}
        record.update(evaluate_model(result.model, tokenizer, self.config, self._windows, self.progress,
                                     request_cache_path(path)))
        record["wall_seconds"] = time.perf_counter() - start
        _write_json(path, record)
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
        model, tokenizer = self._ensure_model()
        rocket = self.config.run_config(seed, self.config.ratios[0], self.config.costs[0])
        result = compress(copy.deepcopy(model), tokenizer, rocket, cache_dir=self.config.cache_dir,
                          data_dir=self.config.data_dir, progress=self.progress)
        save_profiles(path, result.profiles)
        return result.profiles

    def run(self) -> dict:
        cfg = self.config
        check_inputs(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        total = len(cfg.seeds) * len(cfg.ratios) * len(cfg.costs)
        dense = self.dense_record()
        runs, divergence, sweep, done = [], {}, {}, 0
        for seed in cfg.seeds:
            fresh, allocations = None, {}
            for ratio in cfg.ratios:
                for cost in cfg.costs:
                    done += 1
                    log.info("study: run %d/%d: seed %d, removed ratio %g, cost %s", done, total, seed, ratio, cost)
                    record, profiles = self.run_record(seed, ratio, cost)
                    fresh = fresh or profiles
                    runs.append(record)
                    allocations.setdefault(ratio, {})[cost] = Allocation.from_json(record["allocation"])
            profiles = self.profiles(seed, fresh)
            divergence[str(seed)] = analysis.divergence_analysis(profiles, allocations, cfg.costs)
            sweep[str(seed)] = analysis.allocation_sweep(profiles, cfg.sweep_ratios, cfg.costs,
                                                         budget_count=cfg.rocket.budget_count, alpha=cfg.rocket.alpha)
            if seed == cfg.seeds[0]:
                self.first_profiles = profiles
        study = self.assemble(dense, runs, divergence, sweep)
        self.write(study)
        return study

    def assemble(self, dense: dict, runs: list[dict], divergence: dict, sweep: dict) -> dict:
        cfg = self.config
        return {
            "format": FORMAT,
            "config": cfg.to_json(),
            "costs": {c: get_cost(c).description for c in cfg.costs},
            "reference_cost": compare.reference_cost(cfg.costs),
            "dense": _without_examples(dense),
            "runs": [{**_without_examples(r), "file": f"runs/{run_name(r['seed'], r['ratio'], r['cost'])}.json"}
                     for r in runs],
            "layers": [p.name for p in self.first_profiles],
            "main_table": compare.main_table(runs, dense, cfg.costs),
            "statistics": compare.paired_statistics(runs, cfg.costs, n_boot=cfg.n_boot, confidence=cfg.confidence),
            "divergence": divergence,
            "sweep": sweep,
            "runtime": compare.runtime_summary(runs, cfg.costs, sweep),
        }

    def write(self, study: dict) -> None:
        from rocketlm.study import figures, report
        study["figures"] = figures.make_figures(study, self.first_profiles, self.out / "figures")
        study["paper_comparison"] = report.paper_comparison(study)
        _write_json(self.out / "study.json", study)
        (self.out / "report.md").write_text(report.render_report(study))
        log.info("study: wrote %s and %s", self.out / "report.md", self.out / "study.json")


def _without_examples(record: dict) -> dict:
    """A run record without its bulky per-example / per-unit arrays (those stay in runs/*.json)."""
    out = {k: v for k, v in record.items() if k not in ("zeroshot", "ppl", "spec")}
    out["ppl"] = {k: v for k, v in record["ppl"].items() if k not in ("unit_nll", "unit_tokens")}
    zs = record.get("zeroshot")
    if zs:
        out["zeroshot"] = {"average": zs["average"], "unavailable": zs.get("unavailable", {}),
                           "tasks": {t: {k: v for k, v in e.items() if k not in ("per_example", "subtasks")}
                                     for t, e in zs["tasks"].items()}}
    else:
        out["zeroshot"] = None
    return out


def run_study(config: StudyConfig, progress: bool = True) -> dict:
    """Run (or resume) the whole study and write ``report.md``, ``study.json`` and the figures under ``config.out``."""
    return Study(config, progress).run()
