"""Profiling and compression kernels timed per distinct layer shape.

For a ``d_in x d_out`` layer the probe times the pipeline's own functions on synthetic inputs of
that shape (or of a scaled-down one): :func:`profile_layer` itself (the whitened basis and the
candidates it evaluates, however it chooses them: ``ks_search`` included), :func:`layer_basis`
alone, the compression of one layer (factors, module, direct error check) and
:func:`whitening_factor` (rank deficient when the calibration has fewer tokens than ``d_in``, as
the real Gram then is). The synthetic whitened weight is well conditioned: the QR
re-orthonormalisation :func:`layer_basis` adds for a badly conditioned layer with ``d_in > d_out``
is not timed (none of SmolLM2-135M's 30 such layers needs it).

The synthetic weight has the whitened spectrum of a trained layer (singular values ``i^-0.5``;
the median decay of SmolLM2-135M's whitened weights is 0.7, with 0.35..1.8 by layer): how many
candidates a ks search visits and how often the factorization refines in float64 depend on it,
and with ``i^-0.5`` the synthetic profiles of SmolLM2-135M's seven layers of a block take the time its
real layers take (measured with ``ks_search="auto"``: 24.7 s synthetic, 24.9 s real, two blocks; again on
2026-12-07 on an AMD EPYC after the search's bounded scan: 0.95x over four blocks, one thread).

The profiling stage runs ``concurrent`` layers at once (``profile_workers``), which share the caches and
memory bandwidth: ``profile_layer`` is timed with that many copies running at once on threads (under the
wall clock), each on its share of the threads. Timed alone, the probe missed that contention: on the EPYC,
SmolLM2-135M's profiling stage used 204 CPU seconds on two workers where its layers take 181 one at a time,
and the projection read 20% short.

The probe size: starting at 512, the shape doubles (keeping its aspect) while the next
``profile_layer`` is predicted (x8) to stay under ``budget_s`` and the largest side under
``max_dim``; a shape that fits is timed as it is. Times are scaled to the real shape by ``f^3``
(``f`` the linear ratio): every kernel above is cubic in the width (``bench/bench_cost_scaling.py``
measures the exponent; a lower one makes ``f^3`` err on the long side).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rocketlm.compression.apply import refine
from rocketlm.compression.modules import SparseDictionaryLinear
from rocketlm.config import GridConfig
from rocketlm.estimation.timing import measure, wall_clock
from rocketlm.factorization.sparse_dictionary import (candidate_shape, direct_errors, factorize_candidate,
                                                      layer_basis, whitening_factor)
from rocketlm.profiling.profile import profile_layer, valid_shapes

log = logging.getLogger(__name__)

SPECTRUM_DECAY = 0.5  # singular values i^-decay of the synthetic whitened weight (see the module doc)
FIRST_PROBE_DIM = 512


@dataclass(frozen=True)
class LayerProbe:
    """Projected seconds of one layer shape (already scaled to the real shape)."""

    d_in: int
    d_out: int
    probe_d_in: int
    probe_d_out: int
    profile_s: float  # profile_layer: the basis and the candidates it evaluates
    candidates: int  # candidates profile_layer evaluated on the probe
    basis_s: float  # layer_basis alone
    compress_s: float  # compression of one layer after its basis: factors, module, direct check


@dataclass(frozen=True)
class LayerSettings:
    """What of the run's configuration the layer kernels depend on."""

    grid: GridConfig
    removed_ratio: float
    ridge_rel: float = 0.0
    importance_power: float = 0.5
    profile_dtype: str = "float32"
    value_dtype: str = "float32"
    ks_search: str = "exhaustive"  # the profiling's mode and searched costs (profiling.profile.run_ks_search)
    search_costs: tuple[str, ...] = ()
    refine_iters: int = 0  # alternating refits after the closed form, timed with the compression
    concurrent: int = 1  # profile_layer calls timed at once (the profiling stage's layers at once per process)


def scaled_dims(d_in: int, d_out: int, max_dim: int) -> tuple[int, int]:
    """``d_in x d_out`` itself, or scaled down (aspect kept) so that its largest side is ``max_dim``."""
    f = max(d_in, d_out) / max_dim
    if f <= 1.0:
        return d_in, d_out
    return max(1, round(d_in / f)), max(1, round(d_out / f))


def time_scale(d_in: int, d_out: int, p_in: int, p_out: int) -> float:
    """Time factor from the probe shape to the real one (the kernels are cubic)."""
    return (d_in * d_out * min(d_in, d_out)) / (p_in * p_out * min(p_in, p_out))


def synthetic_gram(d: int, rank: int | None = None, decades: float = 2.0, seed: int = 0) -> torch.Tensor:
    """A dense float64 ``d x d`` Gram with eigenvalues spread over ``decades`` (positive definite),
    or of rank ``rank + 1`` when ``rank < d`` (as a Gram of fewer tokens than ``d``)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(decades, 0.0, d, dtype=torch.float64)
    if rank is not None and rank < d:
        lam[rank:] = 0.0
    u = torch.randn(d, generator=g, dtype=torch.float64)
    return torch.diag(lam) + (0.1 * float(lam.mean()) / d) * torch.outer(u, u)


def synthetic_weight(d_in: int, d_out: int, seed: int = 0, decay: float = SPECTRUM_DECAY) -> torch.Tensor:
    """``W`` (d_in x d_out, float64, in the transposed layout :func:`weight_matrix` gives) with singular
    values ``i^-decay`` between random orthonormal bases."""
    g = torch.Generator().manual_seed(seed)
    r = min(d_in, d_out)
    U = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0]
    W = (U * torch.arange(1, r + 1, dtype=torch.float64) ** -decay) @ V.T
    return W.T.contiguous().T


def probe_whitening(d_in: int, tokens: int, max_dim: int, repeats: int = 3,
                    device: str | torch.device = "cpu") -> float:
    """Seconds of :func:`whitening_factor` for a ``d_in`` Gram of ``tokens`` calibration tokens
    (rank deficient, so on its eigenvalue-shift path, when ``tokens < d_in``)."""
    p_in = scaled_dims(d_in, d_in, max_dim)[0]
    rank = None if tokens >= d_in else max(1, round(tokens * p_in / d_in))
    A = synthetic_gram(p_in, rank).to(device)
    seconds = measure(lambda: whitening_factor(A), repeats, device)
    return seconds * (d_in / p_in) ** 3


def _profile_once(p_in: int, p_out: int, settings: LayerSettings, repeats: int, device) -> tuple[float, int, tuple]:
    """Seconds of one :func:`profile_layer` call on a synthetic ``p_in x p_out`` layer, the number of
    candidates it evaluated, and its inputs ``(W, S)``."""
    S = whitening_factor(synthetic_gram(p_in).to(device))
    W = synthetic_weight(p_in, p_out).to(device)
    dtype = getattr(torch, settings.profile_dtype)
    result = []

    def run():
        result.append(profile_layer("probe", W, S, settings.grid, group="g", value_bytes=4,
                                    ridge_rel=settings.ridge_rel, importance_power=settings.importance_power,
                                    dtype=dtype, ks_search=settings.ks_search,
                                    search_costs=settings.search_costs or None))

    if settings.concurrent <= 1 or not wall_clock():
        return measure(run, repeats, device), len(result[0].candidates), (W, S)
    # each copy on the thread count the caller set for one worker (profiling.run.threads_per_worker)
    with ThreadPoolExecutor(settings.concurrent, initializer=torch.set_num_threads,
                            initargs=(torch.get_num_threads(),)) as pool:
        seconds = measure(lambda: list(pool.map(lambda _: run(), range(settings.concurrent))), repeats, device)
    return seconds, len(result[0].candidates), (W, S)


def choose_probe(d_in: int, d_out: int, settings: LayerSettings, max_dim: int, budget_s: float, repeats: int = 3,
                 device: str | torch.device = "cpu") -> tuple[tuple[int, int], float, int, tuple]:
    """Grow the probe shape from 512 by doubling while the next profile_layer is predicted under
    ``budget_s`` (see the module doc). Returns its dims, its profile_layer seconds and candidate count,
    and its synthetic ``(W, S)``."""
    largest = min(max_dim, max(d_in, d_out))
    dims = scaled_dims(d_in, d_out, min(largest, FIRST_PROBE_DIM))
    seconds, count, inputs = _profile_once(*dims, settings, repeats, device)
    while max(dims) < largest:
        following = scaled_dims(d_in, d_out, min(largest, 2 * max(dims)))
        if seconds * time_scale(*following, *dims) > budget_s:
            break
        dims = following
        seconds, count, inputs = _profile_once(*dims, settings, repeats, device)
    return dims, seconds, count, inputs


def _compress_one(basis, W, S, k: int, s: int, ridge_rel: float, value_dtype: torch.dtype,
                  refine_iters: int = 0) -> None:
    """What compression does for one layer after its basis (apply_allocation's body)."""
    fact = factorize_candidate(basis, k, s, ridge_rel=ridge_rel, with_factors=True)
    U, V, _ = refine(W, S, fact, k, s, refine_iters)
    module = SparseDictionaryLinear.from_factors(U, V, fact.mask, s, None, value_dtype)
    direct_errors(W, S, module.U.double() @ module.dense_V().double())


def _compress_shape(p_in: int, p_out: int, grid: GridConfig, ratio: float) -> tuple[int, int] | None:
    """The candidate compression is timed with: the target ratio at the grid's middle ks (or a valid one)."""
    k, s = candidate_shape(p_in, p_out, ratio, grid.ks[len(grid.ks) // 2])
    if 1 <= s <= k <= min(p_in, p_out):
        return k, s
    shapes = valid_shapes(p_in, p_out, grid)
    return shapes[len(shapes) // 2][2:] if shapes else None


def probe_layer(d_in: int, d_out: int, settings: LayerSettings, max_dim: int = 4096, budget_s: float = 30.0,
                repeats: int = 3, device: str | torch.device = "cpu") -> LayerProbe:
    """Time the profiling and compression kernels of a ``d_in x d_out`` layer (see the module doc). Probes of
    ``settings.concurrent > 1`` copies project only the profiling stage: they leave the compression step untimed
    (``compress_s`` 0), which the one-copy probes time."""
    (p_in, p_out), profile_s, count, (W, S) = choose_probe(d_in, d_out, settings, max_dim, budget_s, repeats, device)
    f3 = time_scale(d_in, d_out, p_in, p_out)
    dtype = getattr(torch, settings.profile_dtype)
    basis_of = lambda w: layer_basis(w, S, importance_power=settings.importance_power, dtype=dtype)  # noqa: E731
    basis_s = measure(lambda: basis_of(W), repeats, device)
    compress_s, chosen = 0.0, _compress_shape(p_in, p_out, settings.grid, settings.removed_ratio)
    if chosen is not None and settings.concurrent <= 1:
        basis, value_dtype = basis_of(W), getattr(torch, settings.value_dtype)
        compress_s = measure(lambda: _compress_one(basis, W, S, *chosen, settings.ridge_rel, value_dtype,
                                                   settings.refine_iters), repeats, device)
    probe = LayerProbe(d_in, d_out, p_in, p_out, profile_s * f3, count, basis_s * f3, compress_s * f3)
    log.info("layer %dx%d (timed at %dx%d): profile_layer %.3g s (%d candidates), basis %.3g s, compression %.3g s",
             d_in, d_out, p_in, p_out, probe.profile_s, count, probe.basis_s, probe.compress_s)
    return probe
