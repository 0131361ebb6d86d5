"""Global allocation: one candidate (or "leave dense") per layer, by an exact knapsack.

Options of a layer: for every removed ratio of the grid, the ``ks`` with the smallest cost
(ROCKET.md section 4: the best ``ks`` is chosen by the same error as the allocation), plus
"leave dense" (nothing removed, cost 0). The knapsack minimises the summed (unweighted)
cost subject to removed >= ``removed_ratio`` x the targeted layers' total, counted in values
(as in the paper) or in bytes (values + index structure).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from rocketlm.allocation.costs import get_cost
from rocketlm.config import RocketConfig
from rocketlm.allocation.knapsack import InfeasibleBudgetError, solve_mckp
from rocketlm.profiling.profile import Candidate, LayerProfile
from rocketlm.runtime.forms import form_flops
from rocketlm.errors import InfeasibleAllocationError, ProfileMismatchError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)



ALPHA_GRID = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class LayerChoice:
    name: str
    d_in: int
    d_out: int
    dense: bool
    removed_ratio: float  # nominal grid ratio of the chosen candidate (0 when dense)
    ks: float | None
    k: int | None
    s: int | None
    kept_values: int
    kept_bytes: int
    dense_values: int
    dense_bytes: int
    error_weight: float
    error_output: float
    cost: float

    @property
    def achieved_removed_ratio(self) -> float:
        return 1.0 - self.kept_values / self.dense_values

    @property
    def dense_flops(self) -> int:
        return self.d_in * self.d_out

    @property
    def kept_flops(self) -> int:
        """Multiply-adds per token as run on CPU (see :func:`run_flops`)."""
        return self.dense_flops if self.dense else run_flops(self.d_in, self.d_out, self.k, self.s)


def run_flops(d_in: int, d_out: int, k: int, s: int) -> int:
    """Multiply-adds per token of a compressed layer in the form it runs in: the cheaper of ``factored``
    (``V`` held dense: ``d_in*k + k*d_out``) and ``merged`` (``d_in*d_out``). The sparse form's count
    (``d_in*k + s*d_out``) is not used: measured on CPU, its kernels lose to the dense GEMM at every
    density the grid allows (ks <= 3), see ``bench/bench_inference.py``."""
    return min(form_flops("factored", d_in, d_out, k, s), d_in * d_out)


@dataclass
class Allocation:
    cost: str
    budget_count: str
    target_removed_ratio: float
    alpha: float | None
    choices: list[LayerChoice]
    total_cost: float
    lower_bound: float
    solve_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def dense_values(self) -> int:
        return sum(c.dense_values for c in self.choices)

    @property
    def kept_values(self) -> int:
        return sum(c.kept_values for c in self.choices)

    @property
    def dense_bytes(self) -> int:
        return sum(c.dense_bytes for c in self.choices)

    @property
    def kept_bytes(self) -> int:
        return sum(c.kept_bytes for c in self.choices)

    @property
    def achieved_removed_ratio(self) -> float:
        """Removed fraction of the targeted layers' parameters (values)."""
        return 1.0 - self.kept_values / self.dense_values

    @property
    def achieved_removed_bytes_ratio(self) -> float:
        return 1.0 - self.kept_bytes / self.dense_bytes

    @property
    def achieved_removed_flops_ratio(self) -> float:
        return 1.0 - sum(c.kept_flops for c in self.choices) / sum(c.dense_flops for c in self.choices)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(achieved_removed_ratio=self.achieved_removed_ratio,
                    achieved_removed_bytes_ratio=self.achieved_removed_bytes_ratio,
                    achieved_removed_flops_ratio=self.achieved_removed_flops_ratio,
                    dense_values=self.dense_values, kept_values=self.kept_values,
                    dense_bytes=self.dense_bytes, kept_bytes=self.kept_bytes)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Allocation":
        fields = {k: data[k] for k in ("cost", "budget_count", "target_removed_ratio", "alpha", "total_cost",
                                       "lower_bound", "solve_seconds")}
        return cls(choices=[LayerChoice(**c) for c in data["choices"]], extra=data.get("extra", {}), **fields)


def layer_options(profile: LayerProfile, cost: str) -> list[Candidate]:
    """Best-ks candidate per removed ratio under ``cost`` (ties: smaller ks)."""
    fn = get_cost(cost).fn
    best: dict[float, tuple[float, Candidate]] = {}
    for cand in profile.candidates:
        value = fn(profile, cand)
        if not math.isfinite(value):
            continue
        if cand.removed_ratio not in best or value < best[cand.removed_ratio][0]:
            best[cand.removed_ratio] = (value, cand)
    return [best[r][1] for r in sorted(best)]


def _dense_choice(profile: LayerProfile) -> LayerChoice:
    return LayerChoice(profile.name, profile.d_in, profile.d_out, True, 0.0, None, None, None,
                       profile.dense_values, profile.dense_bytes, profile.dense_values, profile.dense_bytes,
                       0.0, 0.0, 0.0)


def _choice(profile: LayerProfile, cand: Candidate, cost_value: float) -> LayerChoice:
    return LayerChoice(profile.name, profile.d_in, profile.d_out, False, cand.removed_ratio, cand.ks, cand.k,
                       cand.s, cand.kept_values, cand.kept_bytes, profile.dense_values, profile.dense_bytes,
                       cand.error_weight, cand.error_output, cost_value)


def flops_options(profile: LayerProfile, cost: str) -> list[Candidate]:
    """Under a flops budget the best ks per removed ratio is the wrong grouping (two candidates with
    the same values differ in flops): every candidate on the (run flops, cost) Pareto front."""
    fn = get_cost(cost).fn
    scored = sorted(((run_flops(profile.d_in, profile.d_out, c.k, c.s), fn(profile, c), c) for c in profile.candidates
                     if math.isfinite(fn(profile, c))), key=lambda t: (t[0], t[1]))
    front, best = [], math.inf
    for flops, value, cand in scored:
        if value < best and flops < profile.d_in * profile.d_out:
            front.append(cand)
            best = value
    return front


def candidate_choices(profiles: list[LayerProfile], cost: str, budget_count: str = "values") -> list[list[LayerChoice]]:
    """Per layer: "leave dense" first, then the best-ks candidate of every removed ratio (values and bytes
    budgets), or every candidate on the flops/cost Pareto front (flops budget)."""
    fn = get_cost(cost).fn
    pick = flops_options if budget_count == "flops" else layer_options
    return [[_dense_choice(p)] + [_choice(p, c, fn(p, c)) for c in pick(p, cost)] for p in profiles]


def _removed(choice: LayerChoice, budget_count: str) -> int:
    if budget_count == "bytes":
        return choice.dense_bytes - choice.kept_bytes
    if budget_count == "flops":
        return choice.dense_flops - choice.kept_flops
    return choice.dense_values - choice.kept_values


def _budget_total(profiles: list[LayerProfile], budget_count: str) -> int:
    if budget_count == "bytes":
        return sum(p.dense_bytes for p in profiles)
    return sum(p.dense_values for p in profiles)  # dense flops per token = dense values


def _alpha_filter(options: list[list[LayerChoice]], target: float, alpha: float) -> list[list[LayerChoice]]:
    """Reference's cap: drop candidates whose cost exceeds alpha x the mean cost at the target ratio
    (mean over layers of the candidate nearest the target); "leave dense" always stays."""
    at_target = []
    for opts in options:
        compressed = [o for o in opts if not o.dense]
        if compressed:
            at_target.append(min(compressed, key=lambda o: abs(o.removed_ratio - target)).cost)
    cap = alpha * float(np.mean(at_target)) if at_target else math.inf
    return [[o for o in opts if o.dense or o.cost <= cap] for opts in options]


def allocate(profiles: list[LayerProfile], removed_ratio: float, cost: str = RocketConfig.cost,
             budget_count: str = RocketConfig.budget_count, alpha: float | str | None = RocketConfig.alpha) -> Allocation:
    """Solve the multiple-choice knapsack; raises :class:`InfeasibleBudgetError` when the target
    cannot be met (never a silent fallback)."""
    start = time.perf_counter()
    unserved = [p for p in profiles if not p.serves(cost, budget_count)]
    if unserved:
        raise ProfileMismatchError(
            f"{len(unserved)} layer profiles (first: {unserved[0].name}) hold only the candidates the ks search "
            f"visited for {unserved[0].search_costs or 'other costs'}, not the best ks under cost {cost!r}"
            + (" nor every candidate a flops budget needs" if budget_count == "flops" else "")
            + ": profile again with this cost, or with --ks-search exhaustive to serve every cost and budget")
    options = candidate_choices(profiles, cost, budget_count)
    total = _budget_total(profiles, budget_count)
    required = int(math.ceil(removed_ratio * total))
    # "auto": the smallest cap of the reference's grid that stays feasible; if none does, no cap (logged)
    alphas = (*ALPHA_GRID, None) if alpha == "auto" else (alpha,)
    last_error = None
    for a in alphas:
        if alpha == "auto" and a is None:
            log.warning("alpha auto: no cap in %s..%s reaches %.1f%% removed; solving without the cap",
                        ALPHA_GRID[0], ALPHA_GRID[-1], 100 * removed_ratio)
        filtered = options if a is None else _alpha_filter(options, removed_ratio, a)
        removed = [np.array([_removed(o, budget_count) for o in opts], dtype=np.int64) for opts in filtered]
        errors = [np.array([o.cost for o in opts], dtype=np.float64) for opts in filtered]
        try:
            solution = solve_mckp(removed, errors, required)
        except InfeasibleBudgetError as exc:
            last_error = exc
            continue
        choices = [opts[i] for opts, i in zip(filtered, solution.choice)]
        return Allocation(cost=cost, budget_count=budget_count, target_removed_ratio=removed_ratio, alpha=a,
                          choices=choices, total_cost=solution.total_error, lower_bound=solution.lower_bound,
                          solve_seconds=time.perf_counter() - start)
    achievable = last_error.max_removed / total if total else 0.0
    raise InfeasibleAllocationError(
        f"cannot remove {removed_ratio:.1%} of the {budget_count} of the targeted layers with this grid "
        f"(alpha={alpha}): at most {achievable:.2%} is reachable. Lower --ratio, add larger removed ratios to --grid, "
        "or disable the alpha cap") from last_error
