"""From finished runs to the study's tables and tests (pure functions on :class:`RunRecord`\\ s).

* :func:`main_table`: mean +- std over seeds of PPL, average accuracy and every task's accuracy.
* :func:`paired_statistics`: per ratio, every cost against the reference cost: per-task and
  average accuracy differences with paired bootstrap CIs over examples (and seeds), and the
  perplexity difference with its spread over seeds and a bootstrap CI over evaluation windows.
* :func:`runtime_summary`: wall time of each stage per cost.

Every result is a typed record; ``to_json()`` gives its ``study.json`` form.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rocketlm.study.analysis import CostPair, SweepPoint, pairs_json
from rocketlm.study.records import DenseRecord, RunRecord, TaskScores
from rocketlm.study.stats import BootstrapCI, MeanStd, mean_std, paired_bootstrap

def ratio_key(ratio: float) -> str:
    """A removed ratio as a JSON key and in the report: ``0.5`` -> ``"0.5"``."""
    return f"{ratio:g}"


def reference_cost(costs: Sequence[str]) -> str:
    """The baseline every other cost is compared with: ``weight`` (ROCKET) when studied, else the first."""
    return "weight" if "weight" in costs else costs[0]


def _ms_json(value: MeanStd | None) -> dict | None:
    return value.to_json() if value is not None else None


def _group(runs: Sequence[RunRecord]) -> dict[tuple[float, str], list[RunRecord]]:
    """(ratio, cost) -> its runs, seeds in the order of first appearance in ``runs``."""
    seed_order = list(dict.fromkeys(r.seed for r in runs))
    groups: dict[tuple[float, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[(run.ratio, run.cost)].append(run)
    return {k: sorted(v, key=lambda r: seed_order.index(r.seed)) for k, v in groups.items()}


def task_accuracy(run: RunRecord | DenseRecord) -> dict[str, float]:
    zeroshot = run.evaluation.zeroshot
    return zeroshot.accuracy() if zeroshot else {}


def average_accuracy(run: RunRecord | DenseRecord) -> float | None:
    zeroshot = run.evaluation.zeroshot
    return zeroshot.average if zeroshot else None


def _ms(values: Sequence[float | None]) -> MeanStd | None:
    """Mean and std over seeds, or None unless every seed has a value."""
    vals = [v for v in values if v is not None]
    return mean_std(vals) if vals and len(vals) == len(values) else None


# --------------------------------------------------------------------------- main table

@dataclass(frozen=True)
class MainRow:
    """One (removed ratio, cost) of the main table, over seeds."""

    ratio: float
    cost: str
    seeds: tuple[int, ...]
    ppl: MeanStd | None
    acc: MeanStd | None  # average zero-shot accuracy (fraction)
    achieved_removed_ratio: MeanStd | None
    tasks: dict[str, MeanStd | None] = field(default_factory=dict)  # task -> accuracy

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "cost": self.cost, "n_seeds": self.n_seeds, "seeds": list(self.seeds),
                "ppl": _ms_json(self.ppl), "acc": _ms_json(self.acc),
                "achieved_removed_ratio": _ms_json(self.achieved_removed_ratio),
                "tasks": {t: _ms_json(v) for t, v in self.tasks.items()}}


@dataclass(frozen=True)
class DenseRow:
    ppl: float
    acc: float | None
    tasks: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MainTable:
    rows: tuple[MainRow, ...]
    dense: DenseRow | None = None

    @property
    def has_accuracy(self) -> bool:
        return any(r.acc for r in self.rows)

    def row(self, ratio: float, cost: str) -> MainRow | None:
        return next((r for r in self.rows if r.ratio == ratio and r.cost == cost), None)

    def to_json(self) -> dict:
        out: dict = {"rows": [r.to_json() for r in self.rows]}
        if self.dense is not None:
            out["dense"] = self.dense.to_json()
        return out


def _main_row(ratio: float, cost: str, group: Sequence[RunRecord]) -> MainRow:
    tasks = sorted({t for r in group for t in task_accuracy(r)})
    return MainRow(
        ratio=ratio, cost=cost, seeds=tuple(r.seed for r in group),
        ppl=_ms([r.evaluation.ppl.perplexity for r in group]), acc=_ms([average_accuracy(r) for r in group]),
        achieved_removed_ratio=_ms([r.allocation.achieved_removed_ratio for r in group]),
        tasks={t: _ms([task_accuracy(r).get(t) for r in group]) for t in tasks})


def main_table(runs: Sequence[RunRecord], dense: DenseRecord | None = None,
               costs: Sequence[str] | None = None) -> MainTable:
    """Rows by ratio, then in the order of ``costs`` (default: first appearance in ``runs``); the dense model apart."""
    order = list(costs or dict.fromkeys(r.cost for r in runs))
    groups = sorted(_group(runs).items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])))
    rows = tuple(_main_row(ratio, cost, group) for (ratio, cost), group in groups)
    dense_row = None
    if dense is not None:
        dense_row = DenseRow(dense.evaluation.ppl.perplexity, average_accuracy(dense), task_accuracy(dense))
    return MainTable(rows, dense_row)


# --------------------------------------------------------------------------- paired statistics

@dataclass(frozen=True)
class PplRatioCI:
    """The perplexity ratio other / reference with its bootstrap CI (exp of the mean NLL difference's CI)."""

    ratio: float
    low: float
    high: float
    significant: bool
    confidence: float
    n_units: int  # evaluation units (batches of windows) per seed

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PerplexityComparison:
    reference_ppl: tuple[float, ...]  # per seed
    other_ppl: tuple[float, ...]
    diff: MeanStd  # other - reference, over seeds
    relative_diff: MeanStd  # other / reference - 1, over seeds
    log_ratio_ci: BootstrapCI | None = None  # mean NLL difference = log(PPL other / PPL reference)
    ratio_ci: PplRatioCI | None = None

    def to_json(self) -> dict:
        return {"reference_ppl": list(self.reference_ppl), "other_ppl": list(self.other_ppl),
                "diff": self.diff.to_json(), "relative_diff": self.relative_diff.to_json(),
                "log_ratio_ci": self.log_ratio_ci.to_json() if self.log_ratio_ci else None,
                "ratio_ci": self.ratio_ci.to_json() if self.ratio_ci else None}


@dataclass(frozen=True)
class PairComparison:
    """``other`` against ``reference`` at one removed ratio; differences are other minus reference
    (accuracy as a fraction, not pp)."""

    reference: str
    other: str
    seeds: tuple[int, ...]
    perplexity: PerplexityComparison
    tasks: dict[str, BootstrapCI] = field(default_factory=dict)  # task -> accuracy difference CI
    average: BootstrapCI | None = None  # average accuracy over ``average_tasks``, tasks weighted equally
    average_tasks: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {"reference": self.reference, "other": self.other, "seeds": list(self.seeds),
               "perplexity": self.perplexity.to_json(),
               "tasks": {t: ci.to_json() for t, ci in self.tasks.items()}}
        if self.average is not None:
            out["average"] = {**self.average.to_json(), "tasks": list(self.average_tasks)}
        return out


Statistics = dict[float, dict[CostPair, PairComparison]]  # removed ratio -> (reference, other) -> comparison


def statistics_json(statistics: Statistics) -> dict:
    return {ratio_key(r): pairs_json(pairs) for r, pairs in statistics.items()}


def _scores(run: RunRecord, task: str) -> TaskScores:
    zeroshot = run.evaluation.zeroshot
    if zeroshot is None:
        raise ValueError(f"run {run.name} has no zero-shot result")
    return zeroshot.tasks[task]


def _aligned_diffs(ref_runs: Sequence[RunRecord], runs: Sequence[RunRecord], task: str) -> np.ndarray:
    """(n_seeds, n_examples): per-example correctness of ``runs`` minus ``ref_runs``, seed by seed,
    aligned on the documents every run scored."""
    pairs = [(_scores(a, task), _scores(b, task)) for a, b in zip(ref_runs, runs)]
    common = set(pairs[0][0].doc_ids)
    for a, b in pairs:
        common &= set(a.doc_ids) & set(b.doc_ids)
    order = [d for d in pairs[0][0].doc_ids if d in common]
    rows = []
    for a, b in pairs:
        ia, ib = {d: i for i, d in enumerate(a.doc_ids)}, {d: i for i, d in enumerate(b.doc_ids)}
        acc_a, acc_b = np.asarray(a.correct, dtype=np.float64), np.asarray(b.correct, dtype=np.float64)
        rows.append(acc_b[[ib[d] for d in order]] - acc_a[[ia[d] for d in order]])
    return np.stack(rows)


def _ppl_statistics(ref_runs: Sequence[RunRecord], runs: Sequence[RunRecord], boot: dict) -> PerplexityComparison:
    ppl_a = tuple(r.evaluation.ppl.perplexity for r in ref_runs)
    ppl_b = tuple(r.evaluation.ppl.perplexity for r in runs)
    diff = mean_std([b - a for a, b in zip(ppl_a, ppl_b)])
    rel = mean_std([b / a - 1.0 for a, b in zip(ppl_a, ppl_b)])
    units = [(a.evaluation.ppl.unit_nll, b.evaluation.ppl.unit_nll) for a, b in zip(ref_runs, runs)]
    if not (all(ua and ub and len(ua) == len(ub) for ua, ub in units) and len({len(ua) for ua, _ in units}) == 1):
        return PerplexityComparison(ppl_a, ppl_b, diff, rel)
    diffs = np.array([np.subtract(ub, ua) for ua, ub in units])  # (n_seeds, n_units): NLL difference
    ci = paired_bootstrap([diffs], **boot)
    ratio_ci = PplRatioCI(ratio=math.exp(ci.mean_diff), low=math.exp(ci.low), high=math.exp(ci.high),
                          significant=ci.significant, confidence=ci.confidence, n_units=len(units[0][0]))
    return PerplexityComparison(ppl_a, ppl_b, diff, rel, ci, ratio_ci)


def _compare(a_runs: list[RunRecord], b_runs: list[RunRecord], boot: dict) -> PairComparison:
    """``b_runs`` (one cost) against ``a_runs`` (the reference), seed by seed."""
    seeds = [r.seed for r in a_runs if r.seed in {x.seed for x in b_runs}]
    a_runs = [r for r in a_runs if r.seed in seeds]
    b_runs = [r for r in b_runs if r.seed in seeds]
    boot = {**boot, "resample_seeds": len(seeds) >= 3}
    ppl = _ppl_statistics(a_runs, b_runs, boot)
    first = a_runs[0].evaluation.zeroshot
    if first is None or not all(r.evaluation.zeroshot for r in a_runs + b_runs):
        return PairComparison(a_runs[0].cost, b_runs[0].cost, tuple(seeds), ppl)
    avg_tasks = tuple(t for t in first.average_tasks if all(t in task_accuracy(r) for r in a_runs + b_runs))
    strata = {t: _aligned_diffs(a_runs, b_runs, t) for t in avg_tasks}
    return PairComparison(a_runs[0].cost, b_runs[0].cost, tuple(seeds), ppl,
                          tasks={t: paired_bootstrap([d], **boot) for t, d in strata.items()},
                          average=paired_bootstrap(list(strata.values()), **boot) if strata else None,
                          average_tasks=avg_tasks if strata else ())


def paired_statistics(runs: Sequence[RunRecord], costs: Sequence[str], *, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> Statistics:
    """removed ratio -> (reference, other) -> :class:`PairComparison`, for every cost but the reference."""
    ref = reference_cost(costs)
    groups = _group(runs)
    boot = {"n_boot": n_boot, "confidence": confidence, "seed": seed}
    out: Statistics = {}
    for ratio in sorted({k[0] for k in groups}):
        for cost in costs:
            if cost != ref and (ratio, cost) in groups and (ratio, ref) in groups:
                out.setdefault(ratio, {})[(ref, cost)] = _compare(groups[(ratio, ref)], groups[(ratio, cost)], boot)
    return out


# --------------------------------------------------------------------------- runtime

@dataclass(frozen=True)
class CostRuntime:
    """Mean wall seconds per run of one cost (cache hits included as recorded)."""

    n_runs: int
    calibration_seconds: float
    profiling_seconds: float
    allocation_seconds: float
    compression_seconds: float
    solve_seconds: float  # the knapsack alone
    perplexity_seconds: float | None
    zeroshot_seconds: float | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SeedProfilingTime:
    """The fresh calibration and profiling pass of one seed."""

    calibration_seconds: float
    profiling_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Runtime:
    per_cost: dict[str, CostRuntime]
    profiling_per_seed: dict[int, SeedProfilingTime]
    sweep_solve_seconds: dict[str, float] = field(default_factory=dict)  # cost -> mean knapsack seconds

    def to_json(self) -> dict:
        return {"per_cost": {c: r.to_json() for c, r in self.per_cost.items()},
                "profiling_per_seed": {str(s): t.to_json() for s, t in self.profiling_per_seed.items()},
                "sweep_solve_seconds": self.sweep_solve_seconds}


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_stage_seconds(runs: Sequence[RunRecord], stage: str) -> float:
    return float(np.mean([r.stage_seconds(stage) for r in runs]))


def _cost_runtime(mine: Sequence[RunRecord]) -> CostRuntime:
    return CostRuntime(
        n_runs=len(mine), calibration_seconds=_mean_stage_seconds(mine, "calibration"),
        profiling_seconds=_mean_stage_seconds(mine, "profiling"),
        allocation_seconds=_mean_stage_seconds(mine, "allocation"),
        compression_seconds=_mean_stage_seconds(mine, "compression"),
        solve_seconds=float(np.mean([r.allocation.solve_seconds for r in mine])),
        perplexity_seconds=_mean_or_none([r.evaluation.perplexity_seconds for r in mine]),
        zeroshot_seconds=_mean_or_none([r.evaluation.zeroshot_seconds for r in mine]))


def runtime_summary(runs: Sequence[RunRecord], costs: Sequence[str],
                    sweep: dict[int, list[SweepPoint]] | None = None) -> Runtime:
    """Per cost: mean seconds of each stage over its runs, plus the fresh calibration + profiling time
    per seed (the largest over that seed's runs: the one call that computed them), and the sweep's
    allocation solve times per cost."""
    per_cost = {c: _cost_runtime([r for r in runs if r.cost == c]) for c in costs if any(r.cost == c for r in runs)}
    shared = {}
    for seed in dict.fromkeys(r.seed for r in runs):
        mine = [r for r in runs if r.seed == seed]
        shared[seed] = SeedProfilingTime(max(r.stage_seconds("calibration") for r in mine),
                                         max(r.stage_seconds("profiling") for r in mine))
    solve = defaultdict(list)
    for points in (sweep or {}).values():
        for point in points:
            for cost, summary in point.costs.items():
                solve[cost].append(summary.solve_seconds)
    return Runtime(per_cost, shared, {c: float(np.mean(v)) for c, v in solve.items()})
