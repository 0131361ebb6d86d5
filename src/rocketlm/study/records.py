"""The study's per-run records: what the runner writes as ``runs/<run>.json`` (and reads back on
resume) and what :mod:`rocketlm.study.compare` turns into tables and tests.

``to_json()`` / ``from_json()`` are the only places that know the JSON layout; the zero-shot
result of :func:`rocketlm.evaluation.zeroshot.evaluate_zeroshot` is kept verbatim on disk and
read into :class:`ZeroShotEval` (the accuracies and per-example correctness the study uses).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from rocketlm.allocation.plan import Allocation
from rocketlm.evaluation.perplexity import PerplexityResult
from rocketlm.monitor import StageStats
from rocketlm.pipeline import RunKeys

ACC_METRIC = "acc"
_BULKY_TASK_FIELDS = ("per_example", "subtasks")  # left out of study.json (they stay in runs/*.json)


def run_name(seed: int, ratio: float, cost: str) -> str:
    return f"seed{seed}_r{ratio:.3f}_{cost}"


@dataclass(frozen=True)
class PerplexityEval(PerplexityResult):
    """:class:`~rocketlm.evaluation.perplexity.PerplexityResult` plus the mean NLL of every unit of
    ``unit_windows`` windows (the paired bootstrap's units)."""

    unit_windows: int
    unit_nll: tuple[float, ...] = ()
    unit_tokens: tuple[int, ...] = ()

    def to_json(self, units: bool = True) -> dict:
        data = asdict(self)
        if not units:
            del data["unit_nll"], data["unit_tokens"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> PerplexityEval:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**fields, "unit_nll": tuple(data.get("unit_nll", ())),
                      "unit_tokens": tuple(data.get("unit_tokens", ()))})


@dataclass(frozen=True)
class TaskScores:
    """One zero-shot task: accuracy and per-example correctness (0/1) by document id."""

    acc: float | None
    note: str | None = None
    doc_ids: tuple = ()
    correct: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, entry: dict) -> TaskScores:
        per = entry.get("per_example") or {}
        return cls(acc=entry.get(ACC_METRIC), note=entry.get("note"), doc_ids=tuple(per.get("doc_id", ())),
                   correct=tuple(float(v) for v in per.get(ACC_METRIC, ())))


@dataclass(frozen=True)
class ZeroShotEval:
    """The zero-shot suite's result as the study uses it; ``raw`` is what is written to disk."""

    tasks: dict[str, TaskScores]
    average: float | None  # unweighted mean accuracy over ``average_tasks``
    average_tasks: tuple[str, ...]
    unavailable: dict[str, str]  # task -> why it was not evaluated
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def accuracy(self) -> dict[str, float]:
        """task -> accuracy, for the tasks that have one."""
        return {t: s.acc for t, s in self.tasks.items() if s.acc is not None}

    @classmethod
    def from_json(cls, data: dict | None) -> ZeroShotEval | None:
        if not data:
            return None
        average = data.get("average") or {}
        return cls(tasks={t: TaskScores.from_json(e) for t, e in data.get("tasks", {}).items()},
                   average=average.get("value"), average_tasks=tuple(average.get("tasks", ())),
                   unavailable=dict(data.get("unavailable") or {}), raw=data)

    def to_json(self, examples: bool = True) -> dict:
        if examples:
            return self.raw
        tasks = self.raw.get("tasks", {})
        return {"average": self.raw.get("average"), "unavailable": self.unavailable,
                "tasks": {t: {k: v for k, v in e.items() if k not in _BULKY_TASK_FIELDS} for t, e in tasks.items()}}


@dataclass(frozen=True)
class Evaluation:
    """Perplexity and (unless the study runs no tasks) the zero-shot suite of one model."""

    ppl: PerplexityEval
    zeroshot: ZeroShotEval | None
    perplexity_seconds: float
    zeroshot_seconds: float | None = None

    def to_json(self, examples: bool = True) -> dict:
        return {"ppl": self.ppl.to_json(units=examples),
                "zeroshot": self.zeroshot.to_json(examples) if self.zeroshot else None,
                "eval_seconds": {"perplexity": self.perplexity_seconds, "zeroshot": self.zeroshot_seconds}}

    @classmethod
    def from_json(cls, data: dict) -> Evaluation:
        seconds = data.get("eval_seconds") or {}
        return cls(ppl=PerplexityEval.from_json(data["ppl"]), zeroshot=ZeroShotEval.from_json(data.get("zeroshot")),
                   perplexity_seconds=seconds.get("perplexity", 0.0), zeroshot_seconds=seconds.get("zeroshot"))


@dataclass(frozen=True)
class DenseRecord:
    """The dense model's evaluation (``runs/dense.json``); ``spec`` is what a resume compares."""

    spec: dict
    model: str
    evaluation: Evaluation
    wall_seconds: float

    def to_json(self, examples: bool = True) -> dict:
        head = {"spec": self.spec} if examples else {}
        return {**head, "model": self.model, **self.evaluation.to_json(examples), "wall_seconds": self.wall_seconds}

    @classmethod
    def from_json(cls, data: dict) -> DenseRecord:
        return cls(spec=data.get("spec", {}), model=data["model"], evaluation=Evaluation.from_json(data),
                   wall_seconds=data.get("wall_seconds", 0.0))


@dataclass(frozen=True)
class RunRecord:
    """One (seed, removed ratio, cost) run: its allocation, stage times and evaluation (``runs/<name>.json``)."""

    spec: dict  # the compression and evaluation settings, compared on resume
    seed: int
    ratio: float
    cost: str
    allocation: Allocation
    stages: dict[str, StageStats]
    keys: RunKeys | None
    checks: dict
    evaluation: Evaluation
    wall_seconds: float

    @property
    def name(self) -> str:
        return run_name(self.seed, self.ratio, self.cost)

    def stage_seconds(self, stage: str) -> float:
        """Wall seconds of a pipeline stage (0 when the run did not record it)."""
        return self.stages[stage].seconds if stage in self.stages else 0.0

    def to_json(self, examples: bool = True) -> dict:
        """``examples=False``: the summary kept in ``study.json`` (no spec, per-example or per-unit arrays)."""
        head = {"spec": self.spec} if examples else {}
        return {**head, "seed": self.seed, "ratio": self.ratio, "cost": self.cost,
                "allocation": self.allocation.to_json(),
                "stages": {name: st.to_json() for name, st in self.stages.items()},
                "keys": asdict(self.keys) if self.keys else None, "checks": self.checks,
                **self.evaluation.to_json(examples), "wall_seconds": self.wall_seconds}

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        return cls(spec=data.get("spec", {}), seed=data["seed"], ratio=data["ratio"], cost=data["cost"],
                   allocation=Allocation.from_json(data["allocation"]),
                   stages={name: StageStats(**st) for name, st in (data.get("stages") or {}).items()},
                   keys=RunKeys(**data["keys"]) if data.get("keys") else None, checks=data.get("checks") or {},
                   evaluation=Evaluation.from_json(data), wall_seconds=data.get("wall_seconds", 0.0))
