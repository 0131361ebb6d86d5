"""One typed, validated configuration object for the Python API, the CLI and the checkpoint.

Ratios are always *removed* fractions (``removed_ratio``): 0.3 means 30% of the
parameters of the targeted decoder-layer linears are removed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any
from rocketlm.allocation.costs import available_costs
from rocketlm.errors import ConfigError  # noqa: F401  (re-exported)


DEFAULT_REMOVED_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 15))  # 0.05 .. 0.70
DEFAULT_KS = tuple(round(1.0 + 0.1 * i, 1) for i in range(21))  # 1.0 .. 3.0

BUDGET_COUNTS = ("values", "bytes", "flops")
RUNTIMES = ("auto", "compact", "factored", "sparse", "packed", "merged", "canonical")
KS_SEARCHES = ("auto", "exhaustive")




@dataclass(frozen=True)
class GridConfig:
    """Candidates profiled for every layer: removed ratio x ks (dictionary size / nonzeros per column)."""

    removed_ratios: tuple[float, ...] = DEFAULT_REMOVED_RATIOS
    ks: tuple[float, ...] = DEFAULT_KS

    def __post_init__(self) -> None:
        object.__setattr__(self, "removed_ratios", tuple(sorted(float(r) for r in self.removed_ratios)))
        object.__setattr__(self, "ks", tuple(sorted(float(k) for k in self.ks)))
        if not self.removed_ratios or not self.ks:
            raise ConfigError("grid: removed_ratios and ks must both be non-empty")
        for r in self.removed_ratios:
            if not 0.0 < r < 1.0:
                raise ConfigError(f"grid: removed ratio {r} is outside (0, 1); use e.g. 0.05..0.70")
        for k in self.ks:
            if k < 1.0:
                raise ConfigError(f"grid: ks {k} < 1 (ks = dictionary size / nonzeros per column, so ks >= 1)")

    @classmethod
    def parse(cls, text: str) -> "GridConfig":
        """Parse ``"removed=0.05:0.70:0.05;ks=1.0:3.0:0.1"`` (start:stop:step, inclusive) or lists ``"removed=0.1,0.2;ks=1,2"``."""
        parts = dict(p.split("=", 1) for p in text.replace(" ", "").split(";") if p)
        unknown = set(parts) - {"removed", "ks"}
        if unknown or not parts:
            raise ConfigError(f"--grid {text!r}: expected 'removed=START:STOP:STEP;ks=START:STOP:STEP' (or comma lists)")
        kwargs = {}
        if "removed" in parts:
            kwargs["removed_ratios"] = parse_values(parts["removed"])
        if "ks" in parts:
            kwargs["ks"] = parse_values(parts["ks"])
        return cls(**kwargs)


def parse_values(text: str, what: str = "grid range") -> tuple[float, ...]:
    """``"START:STOP:STEP"`` (inclusive) or a comma list ``"0.2,0.5"`` -> floats; ``what`` names the flag in errors."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError("step must be > 0")
            count = int(round((stop - start) / step)) + 1
            return tuple(round(start + i * step, 6) for i in range(count))
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r}: expected comma-separated numbers or START:STOP:STEP ({exc})") from None


OFFLOAD_MODES = ("none", "auto", "cpu", "disk")
# sequential calibration with upstream correction and damping 0.1 on top of fisher + 3 refits, SmolLM2-135M at the
# reference settings, WikiText-2 first 40 windows (README, Quality at 20% and 50%): 50% removed 183.0 -> 118.1,
# 35% 57.28 -> 47.84, 20% 26.79 -> 26.78 (no gain for about 1.6x the whole run's time): on where it pays
# (damping 0.03 / 0.3: 124.2 / 120.7 at 50%, 27.46 / 26.74 at 20%)
SEQUENTIAL_AUTO_FROM_REMOVED = 0.35
SEQUENTIAL_AUTO_DAMPING = 0.1


@dataclass(frozen=True)
class RocketConfig:
    """Everything that determines a compression run (saved verbatim in the checkpoint)."""

    # what to compress and how much
    model: str = "smollm2-135m"
    removed_ratio: float = 0.5
    cost: str = "fisher"  # predicted loss increase (bench/bench_quality.py: best PPL at 20% and 50% of weight,
    # output, blend and fisher on SmolLM2-135M); "weight" = ROCKET, "output" = ROCKET-ActCost
    budget_count: str = "values"  # "values" (as in the paper), "bytes" (values + index bitmap on disk) or "flops"
    # (multiply-adds per token of the form the layer runs in on CPU: the cheaper of factored and merged)
    alpha: float | str | None = "auto"  # reference's error cap: drop candidates with error > alpha * mean error at
    # the target ratio; a number >= 1, "auto" (the reference's default: smallest of 1.0, 1.1, ..., 2.0 that stays
    # feasible) or None / "off" (the plain knapsack of the paper)
    targets: tuple[str, ...] = ()  # regex patterns over module names; empty = every nn.Linear in the decoder blocks
    ignore: tuple[str, ...] = ()
    # calibration
    calib_files: tuple[str, ...] = ()  # empty = the files in $ROCKETLM_DATA/calib
    calib_dataset: str | None = None  # HF dataset name (online only)
    calib_samples: int = 256
    calib_seq_len: int = 1024
    calib_batch_size: int = 4
    seed: int = 2023
    # profiling / factorization
    grid: GridConfig = field(default_factory=GridConfig)
    whitening_eps: float = 7e-6  # added to the Gram spectrum when it is not positive definite (reference value)
    ridge_rel: float = 0.0  # dictionary refit ridge relative to mean diag(C C^T); a singular C C^T gets >= 1e-9 anyway
    importance_power: float = 0.5  # importance = |C_ij| * ||S^-1 q_i||^power (reference compression step)
    profile_dtype: str = "float32"  # dtype of the per-candidate algebra (whitening and SVD are always float64)
    ks_search: str = "auto"  # "auto": per (layer, removed ratio) only the candidates a descent over ks visits for
    # the run's cost (fisher: the output error's best ks; the best ks is exact where the error is unimodal in ks;
    # where it is not, the ks around its minima are scanned); "exhaustive": every candidate of the grid (what
    # `rocketlm study`, which compares costs on one profile, and a flops budget, whose Pareto fronts need every
    # candidate, always use). On SmolLM2-135M's full grid the search visits 53% of the candidates for the output
    # error (55% for the weight error), takes about 0.6x the exhaustive profiling time and finds the exhaustive best
    # ks on 2939 of 2940 (layer, removed ratio) for output and 2940 for weight, identical allocations
    # (bench/bench_profiling.py --compare);
    # searching all three profiling-time costs at once visited 88% and was slower than the scan.
    profile_workers: int = 0  # layers profiled at once in one process (threads sharing its intra-op threads);
    # 0 = auto: 2 on a CPU with >= 2 threads (0.78x the time on SmolLM2, 2 cores), 1 on other devices and
    # offloaded runs. Does not change the profiles beyond floating-point summation order.
    # compression stage (rocketlm.compression.sequential): statistics and target each chosen layer is factored with
    # None = auto, decided per run by rocketlm.compression.sequential.decide_sequential (the resolved values are what
    # the checkpoint records): sequential from SEQUENTIAL_AUTO_FROM_REMOVED on, in one process with the weights in
    # memory; upstream_correction with sequential; damping SEQUENTIAL_AUTO_DAMPING with sequential, else 0
    sequential: bool | None = None  # factor each layer with the Gram of its input in the model compressed so far
    upstream_correction: bool | None = None  # (needs sequential) fit the dense outputs X_d W from compressed inputs
    sequential_damping: float | None = None  # (sequential) ridge x mean diag added to the Gram and cross-Gram: pulls
    # the fit towards the original weight where the calibration inputs are weak
    sequential_samples: int = 64  # (sequential) calibration windows (the first N) the sequential pass runs: its time
    # grows with them (every window through every block again, beside the dense stream). SmolLM2-135M at 50%, the
    # full defaults (256 x 1024): all 256 windows 1895 s of compression stage, PPL 113.71 (first 40 windows); the
    # first 64: 448 s, 116.74; at the reference settings (64 x 512) the pass takes the model from 183 to 118
    refine_iters: int = 3  # alternating closed-form refits of U and of V's kept values after the closed form
    # (least squares: U by one solve, the kept values by converged conjugate gradients; the output error never
    # grows; 0 ships the closed form as profiled)
    # allocation cost "fisher": per-layer sensitivities from a backward pass (no weight update)
    sensitivity_samples: int = 16  # calibration windows (the first N) used to measure the sensitivities
    # runtime
    device: str = "cpu"
    runtime: str = "auto"  # run-time form of compressed layers after loading: auto (fastest measured), compact
    # (per layer the exact form with the fewest resident bytes), factored, sparse, packed, merged, canonical
    save_dtype: str | None = None  # dtype of the saved compressed tensors; None = the model's dtype
    offload: str = "none"  # where the weights stay: none/cpu (in memory), disk (safetensors, one block onloaded
    # at a time: rocketlm.offload) or auto (disk when the weights would not fit comfortably in free memory)

    def __post_init__(self) -> None:
        if not 0.0 < self.removed_ratio < 1.0:
            raise ConfigError(f"removed_ratio={self.removed_ratio}: must be in (0, 1), e.g. 0.2 removes 20% of the parameters")
        if self.cost not in _known_costs():
            raise ConfigError(f"cost={self.cost!r}: choose one of {', '.join(_known_costs())}")
        if self.budget_count not in BUDGET_COUNTS:
            raise ConfigError(f"budget_count={self.budget_count!r}: choose one of {', '.join(BUDGET_COUNTS)}")
        if isinstance(self.alpha, str) and self.alpha.lower() in ("off", "none"):
            object.__setattr__(self, "alpha", None)
        if self.alpha is not None and self.alpha != "auto":
            try:
                object.__setattr__(self, "alpha", float(self.alpha))
            except ValueError:
                raise ConfigError(f"alpha={self.alpha!r}: use a number >= 1, 'auto' or 'off'") from None
            if self.alpha < 1.0:
                raise ConfigError(f"alpha={self.alpha}: the error cap factor must be >= 1 (or 'off' to disable)")
        for name in ("calib_samples", "calib_seq_len", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.ridge_rel < 0 or self.whitening_eps <= 0:
            raise ConfigError(f"ridge_rel={self.ridge_rel} must be >= 0 and whitening_eps={self.whitening_eps} > 0")
        if self.sequential_damping is not None and self.sequential_damping < 0:
            raise ConfigError(f"sequential_damping={self.sequential_damping}: must be >= 0 (e.g. 0.1)")
        if self.sequential_samples < 1:
            raise ConfigError(f"sequential_samples={self.sequential_samples}: must be >= 1 (calibration windows)")
        if self.refine_iters < 0 or self.sensitivity_samples < 1:
            raise ConfigError(f"refine_iters={self.refine_iters} must be >= 0 and "
                              f"sensitivity_samples={self.sensitivity_samples} >= 1")
        if self.upstream_correction and self.sequential is False:
            raise ConfigError("upstream_correction needs sequential calibration (it fits the dense outputs from the "
                              "compressed model's inputs): set sequential=True (--sequential) as well")
        if self.sequential_damping and self.sequential is False:
            raise ConfigError(f"sequential_damping={self.sequential_damping} damps the sequential Grams: set "
                              "sequential=True (--sequential) as well, or drop it")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime={self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.ks_search not in KS_SEARCHES:
            raise ConfigError(f"ks_search={self.ks_search!r}: choose one of {', '.join(KS_SEARCHES)}")
        if self.profile_workers < 0:
            raise ConfigError(f"profile_workers={self.profile_workers}: must be >= 0 (0 = auto)")
        if self.profile_dtype not in ("float32", "float64"):
            raise ConfigError(f"profile_dtype={self.profile_dtype!r}: choose float32 or float64")
        if self.save_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"save_dtype={self.save_dtype!r}: choose float32, float16 or bfloat16")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"offload={self.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
        if self.offload == "disk" and (self.sequential or self.upstream_correction):
            raise ConfigError("offload='disk' does not yet support sequential calibration; drop it or use "
                              "offload='none'")
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", GridConfig(**self.grid))
        for name in ("targets", "ignore", "calib_files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def sequential_windows(self) -> int:
        """Calibration windows the sequential pass runs: the first ``sequential_samples`` of them."""
        return min(self.sequential_samples, self.calib_samples)

    def replace(self, **changes: Any) -> "RocketConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RocketConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("grid"), dict):
            data["grid"] = GridConfig(**data["grid"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _known_costs() -> tuple[str, ...]:
    return available_costs()
