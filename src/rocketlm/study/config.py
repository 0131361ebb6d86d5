"""What the study runs: :class:`StudyConfig`, the one place its defaults are written
(the ``rocketlm study`` CLI takes every default from here)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rocketlm.allocation.costs import available_costs
from rocketlm.config import RocketConfig
from rocketlm.errors import ConfigError

DEFAULT_COSTS = ("weight", "output", "blend")
DEFAULT_SEEDS = (2023, 42)
DEFAULT_RATIOS = (0.2, 0.5)
DEFAULT_SWEEP = tuple(round(0.1 + 0.05 * i, 2) for i in range(11))  # 0.10 .. 0.60
NO_TASKS = "none"


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
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"study: confidence={self.confidence} must be in (0, 1), e.g. 0.95")
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
        # every candidate: the study allocates every cost (and the sweeps every ratio) from one seed's profiles
        return self.rocket.replace(model=self.model, seed=seed, removed_ratio=ratio, cost=cost, ks_search="exhaustive")

    def eval_spec(self) -> dict:
        """The evaluation settings a finished run is compared on when the study resumes."""
        return {"tasks": self.task_names, "limit": self.limit, "ppl_seq_len": self.ppl_seq_len,
                "ppl_limit": self.ppl_limit, "ppl_batch_size": self.ppl_batch_size, "dtype": self.dtype}

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["rocket"] = self.rocket.to_dict()
        data["task_names"] = self.task_names
        return data
