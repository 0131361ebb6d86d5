"""Statistics for the cost study: pure functions on numbers (no I/O, no model).

* :func:`spearman`: ``scipy.stats.spearmanr`` (average ranks for ties), NaN where undefined.
* :func:`mean_std`: mean and sample standard deviation (ddof=1) over seeds.
* :func:`paired_bootstrap`: percentile confidence interval of a paired mean difference,
  resampling examples (the same resample for every seed, since the seeds evaluate the same
  documents) and optionally seeds too; several strata (tasks) are averaged with equal weight,
  as the headline average accuracy is. :func:`paired_bootstrap_ci` (one seed) and
  :func:`paired_bootstrap_ci_seeds` (several seeds) are the two common cases.

A difference is called *significant* when its confidence interval excludes 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.stats

DEFAULT_N_BOOT = 2000
DEFAULT_CONFIDENCE = 0.95
_CHUNK_VALUES = 2_000_000  # resampled indices held at once (bounds memory for large tasks)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of paired samples (``scipy.stats.spearmanr``, average ranks for ties).

    NaN when fewer than two pairs or when either sample is constant (the correlation is undefined).
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"spearman: x has {xs.size} values but y has {ys.size}; pass paired samples")
    if xs.size < 2 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(xs, ys).statistic)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float | None  # sample std (ddof=1); None with a single value
    n: int
    values: tuple[float, ...]

    def to_json(self) -> dict:
        return asdict(self)


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (ddof=1) of per-seed values."""
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ValueError("mean_std: no values")
    arr = np.asarray(vals)
    std = float(arr.std(ddof=1)) if len(vals) > 1 else None
    return MeanStd(float(arr.mean()), std, len(vals), vals)


@dataclass(frozen=True)
class BootstrapCI:
    """Paired difference (b - a) with a percentile bootstrap confidence interval."""

    mean_diff: float  # the observed statistic
    low: float
    high: float
    confidence: float
    n_boot: int
    n_examples: int  # summed over strata
    n_seeds: int
    resampled: str  # "examples" or "examples+seeds"
    per_seed_diff: tuple[float, ...]  # the statistic of each seed alone

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0.0 or self.high < 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def _as_strata(diffs) -> list[np.ndarray]:
    """Each stratum as a float array (n_seeds, n_examples); one array / flat list, or a list of them."""
    if isinstance(diffs, np.ndarray) or any(np.ndim(d) == 0 for d in diffs):
        diffs = [diffs]
    strata = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in diffs]
    if not strata or any(s.shape[1] == 0 for s in strata):
        raise ValueError("paired_bootstrap: every stratum needs at least one example")
    n_seeds = strata[0].shape[0]
    if any(s.shape[0] != n_seeds for s in strata):
        raise ValueError("paired_bootstrap: every stratum needs one row per seed (same number of seeds)")
    return strata


def _bootstrap_draws(strata: list[np.ndarray], n_boot: int, rng: np.random.Generator,
                     resample_seeds: bool) -> np.ndarray:
    """``n_boot`` resampled statistics, drawn in chunks of whole resamples (vectorised per chunk)."""
    n_seeds = strata[0].shape[0]
    draws = np.empty(n_boot)
    largest = max(s.shape[1] for s in strata)
    chunk = max(1, min(n_boot, _CHUNK_VALUES // max(1, largest * n_seeds)))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        seed_idx = rng.integers(0, n_seeds, size=(size, n_seeds)) if resample_seeds else None
        total = np.zeros(size)
        for s in strata:
            idx = rng.integers(0, s.shape[1], size=(size, s.shape[1]))
            by_seed = s[:, idx].mean(axis=2).T  # (size, n_seeds): every seed on the same resampled examples
            if seed_idx is not None:
                by_seed = np.take_along_axis(by_seed, seed_idx, axis=1)
            total += by_seed.mean(axis=1)
        draws[start:start + size] = total / len(strata)
    return draws


def paired_bootstrap(diffs, *, n_boot: int = DEFAULT_N_BOOT, confidence: float = DEFAULT_CONFIDENCE,
                     seed: int = 0, resample_seeds: bool = False) -> BootstrapCI:
    """Bootstrap CI of ``mean over strata of mean over seeds of mean over examples`` of paired differences.

    ``diffs``: a list of strata (e.g. tasks), each an array ``(n_seeds, n_examples)`` of per-example
    paired differences ``b - a`` (a 1-D array is one seed). Each bootstrap draw resamples the
    examples of every stratum with replacement, the same indices for all seeds (the seeds score
    the same documents); with ``resample_seeds`` it also resamples the seeds (one draw shared by
    all strata). The interval is the percentile interval of the ``n_boot`` draws.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be in (0, 1), e.g. 0.95")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be >= 1")
    strata = _as_strata(diffs)
    per_seed = np.mean([s.mean(axis=1) for s in strata], axis=0)  # (n_seeds,)
    draws = _bootstrap_draws(strata, n_boot, np.random.default_rng(seed), resample_seeds)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return BootstrapCI(mean_diff=float(per_seed.mean()), low=float(low), high=float(high), confidence=confidence,
                       n_boot=n_boot, n_examples=int(sum(s.shape[1] for s in strata)), n_seeds=len(per_seed),
                       resampled="examples+seeds" if resample_seeds else "examples",
                       per_seed_diff=tuple(float(v) for v in per_seed))


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], **kwargs) -> BootstrapCI:
    """CI of ``mean(b - a)`` over paired examples of one run (e.g. per-example correctness 0/1)."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired_bootstrap_ci: a {xa.shape} and b {xb.shape} must be 1-D and paired")
    return paired_bootstrap([(xb - xa)[None, :]], **kwargs)


def paired_bootstrap_ci_seeds(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                              **kwargs) -> BootstrapCI:
    """CI of the seed-averaged ``mean(b - a)``; ``a``, ``b``: (n_seeds, n_examples), same examples per seed."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 2:
        raise ValueError(f"paired_bootstrap_ci_seeds: a {xa.shape} and b {xb.shape} must be (n_seeds, n_examples)")
    return paired_bootstrap([xb - xa], **kwargs)
