"""The assembled study (:class:`StudyResult`): what :func:`rocketlm.study.run_study` returns, what the
figures and the report are drawn from, and (``to_json()``) what ``study.json`` holds."""
from __future__ import annotations

from dataclasses import dataclass, field

from rocketlm.study.analysis import SeedDivergence, SweepPoint
from rocketlm.study.compare import MainTable, Runtime, Statistics, statistics_json
from rocketlm.study.config import StudyConfig
from rocketlm.study.records import DenseRecord, RunRecord
from rocketlm.study.report import PaperClaim

FORMAT = "rocketlm-study/1"


@dataclass
class StudyResult:
    config: StudyConfig
    cost_descriptions: dict[str, str]  # cost -> what it measures
    reference_cost: str
    dense: DenseRecord
    runs: list[RunRecord]
    layers: list[str]  # targeted layers, model order
    main_table: MainTable
    statistics: Statistics
    divergence: dict[int, SeedDivergence]  # seed -> its analysis
    sweep: dict[int, list[SweepPoint]]  # seed -> allocation-only sweep
    runtime: Runtime
    figures: dict[str, str] = field(default_factory=dict)  # figure name -> path relative to the study directory
    paper_comparison: list[PaperClaim] = field(default_factory=list)

    @property
    def first_seed(self) -> int:
        return self.config.seeds[0]

    def runs_at(self, seed: int, ratio: float) -> dict[str, RunRecord]:
        """cost -> the run of ``seed`` at removed ratio ``ratio``."""
        return {r.cost: r for r in self.runs if r.seed == seed and abs(r.ratio - ratio) < 1e-12}

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "config": self.config.to_json(),
            "costs": self.cost_descriptions,
            "reference_cost": self.reference_cost,
            "dense": self.dense.to_json(examples=False),
            "runs": [{**r.to_json(examples=False), "file": f"runs/{r.name}.json"} for r in self.runs],
            "layers": self.layers,
            "main_table": self.main_table.to_json(),
            "statistics": statistics_json(self.statistics),
            "divergence": {str(seed): d.to_json() for seed, d in self.divergence.items()},
            "sweep": {str(seed): [p.to_json() for p in points] for seed, points in self.sweep.items()},
            "runtime": self.runtime.to_json(),
            "figures": self.figures,
            "paper_comparison": [c.to_json() for c in self.paper_comparison],
        }
