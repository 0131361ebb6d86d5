"""Which rank does what: calibration batches (contiguous shares) and layers (bin-packing by cost).

Layer costs are multiply-add estimates of the algebra each layer needs (whitening, the
whitened SVD, and per candidate the Gram / cross products, a Cholesky and triangular
solves), so a 1536-wide ``down_proj`` with 280 candidates weighs what it costs rather than
one unit as in a round-robin. The packing is the longest-processing-time greedy: layers by
decreasing cost, each to the least loaded rank (ties: lower rank), deterministic on every rank.
"""
from __future__ import annotations

import math

from rocketlm.config import GridConfig
from rocketlm.errors import ConfigError
from rocketlm.profiling.profile import valid_shapes


def basis_cost(d_in: int, d_out: int) -> float:
    """Multiply-adds of one layer's whitening and whitened SVD (before any candidate)."""
    r = min(d_in, d_out)
    return d_in ** 3 / 3 + d_in * d_in * d_out + 4.0 * d_in * d_out * r + 10.0 * r ** 3 + d_out * r * math.log2(r + 1)


def candidate_cost(d_in: int, d_out: int, k: int, s: int) -> float:
    """Multiply-adds of one candidate: ``C C^T``, ``B C^T``, Cholesky, solve, ``Y H``."""
    r = min(d_in, d_out)
    if s >= k:
        return float(r)  # the unsparsified candidate is a tail sum
    return d_out * k * (k + r) + k * r * (k + r) + k ** 3 / 3


def profile_cost(d_in: int, d_out: int, grid: GridConfig) -> float:
    """Estimated cost of profiling one layer over ``grid``."""
    return basis_cost(d_in, d_out) + sum(candidate_cost(d_in, d_out, k, s)
                                         for _, _, k, s in valid_shapes(d_in, d_out, grid))


def factor_cost(d_in: int, d_out: int, k: int, s: int) -> float:
    """Estimated cost of factoring one layer with its chosen candidate (and checking it)."""
    return basis_cost(d_in, d_out) + candidate_cost(d_in, d_out, k, s) + 2.0 * d_in * d_out * k


def balance(costs: dict[str, float], bins: int) -> list[list[str]]:
    """Longest-processing-time greedy: ``bins`` lists of names (each in the order of ``costs``)."""
    loads = [0.0] * bins
    chosen: list[set[str]] = [set() for _ in range(bins)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        target = min(range(bins), key=lambda b: (loads[b], b))
        loads[target] += costs[name]
        chosen[target].add(name)
    return [[n for n in costs if n in part] for part in chosen]


def batch_share(n_windows: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Window range ``[start, stop)`` of ``rank``: a contiguous run of whole batches, so every rank
    forwards exactly the batches a single process would (same shapes, same arithmetic)."""
    n_batches = math.ceil(n_windows / batch_size)
    if n_batches < world_size:
        raise ConfigError(f"calibration: {n_windows} windows make {n_batches} batches of {batch_size}, fewer than "
                          f"the {world_size} processes; lower --calib-batch-size, raise --calib-samples or start at "
                          f"most {n_batches} processes")
    first, last = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return first * batch_size, min(last * batch_size, n_windows)
