"""The sparse step between two candidates of one layer, as one compiled loop per column (CPU, numba).

Profiling reaches a candidate ``(k, s)`` from the products of the previous one (``ProductState``, see
:func:`rocketlm.factorization.sparse_dictionary.factorize_next`). Before the two sparse products, a step finds the
new selection thresholds (per column, the position in ``order`` of the ``s``-th atom below ``k``) near the old
ones and lists the entries of ``C`` that changed, in CSR order. In torch that is about forty small vectorised
kernels over windows of positions (``_thresholds_near``, ``_delta_entries``, ``_by_atom``): 27% of SmolLM2-135M's
full-grid profiling time (cProfile, blocks 3 and 20, one thread), for work that is a short walk per column. The
same walk compiled with numba takes 0.4 ms a step and made the profile of those 14 layers 1.32x faster
(bit-identical errors; ``bench/bench_profiling.py --compiled-steps no,yes``). Written here because no library
offers this selection; torch's path stays for other devices and where numba is not installed.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

try:
    import numba
except ImportError:  # a dependency; missing only where installed without it (--no-deps)
    numba = None


def _step_plan(order, position, thr_old, k_old, s_old, k, s, Bt):  # pragma: no cover (compiled)
    """``(thr, crow, atoms, cols, values)``: per column the position in ``order`` of the ``s``-th atom below ``k``,
    and the entries of ``C_new - C_old`` (atoms below ``k``) by atom, then by column.

    ``order`` (d_out x width, int32): per column the atoms by decreasing importance, padded with ``r``;
    ``position`` (d_out x r, int32): where each atom stands in its column's ``order``; ``thr_old`` (d_out,
    int32): the thresholds of the old candidate ``(k_old, s_old)``; ``Bt`` (d_out x r): ``C``'s values.
    Per column, the count of atoms below ``k`` up to the old threshold is ``s_old`` corrected for the atoms that
    left or entered the dictionary; the new threshold is walked to from the old one. An atom below both ``k``
    changes where its position lies between the two thresholds (+ where the new threshold is later, - where
    earlier); an atom new to the dictionary enters where its position is at most the new threshold."""
    d_out = order.shape[0]
    thr = np.empty(d_out, np.int32)
    counts = np.zeros(k + 1, np.int64)  # counts[a + 1]: changed entries of atom a, then CSR row offsets
    common = min(k_old, k)
    for j in range(d_out):
        t = thr_old[j]
        c = s_old
        for a in range(k, k_old):
            if position[j, a] <= t:
                c -= 1
        for a in range(k_old, k):
            if position[j, a] <= t:
                c += 1
        p = t
        if c < s:
            while c < s:
                p += 1
                if order[j, p] < k:
                    c += 1
        else:
            while not (order[j, p] < k and c == s):
                if order[j, p] < k:
                    c -= 1
                p -= 1
        thr[j] = p
        for q in range(min(t, p) + 1, max(t, p) + 1):
            if order[j, q] < common:
                counts[order[j, q] + 1] += 1
        for a in range(k_old, k):
            if position[j, a] <= p:
                counts[a + 1] += 1
    for a in range(k):
        counts[a + 1] += counts[a]
    n = counts[k]
    atoms = np.empty(n, np.int64)
    cols = np.empty(n, np.int64)
    values = np.empty(n, Bt.dtype)
    fill = counts[:k].copy()
    for j in range(d_out):
        t, p = thr_old[j], thr[j]
        sign = 1.0 if p > t else -1.0
        for q in range(min(t, p) + 1, max(t, p) + 1):
            a = order[j, q]
            if a < common:
                i = fill[a]
                fill[a] += 1
                atoms[i], cols[i], values[i] = a, j, sign * Bt[j, a]
        for a in range(k_old, k):
            if position[j, a] <= p:
                i = fill[a]
                fill[a] += 1
                atoms[i], cols[i], values[i] = a, j, Bt[j, a]
    return thr, counts, atoms, cols, values


# compiled on first use (about 1.6 s, then cached on disk); releases the GIL: layers are profiled on threads
_compiled = numba.njit(nogil=True, cache=True)(_step_plan) if numba is not None else None
_warned = False


def available(device: torch.device) -> bool:
    """Whether :func:`step_plan` runs for tensors on ``device`` (CPU, with numba installed)."""
    global _warned
    if device.type != "cpu":
        return False
    if _compiled is None and not _warned:
        _warned = True
        log.warning("numba is not installed: profiling takes torch's slower path for its sparse steps "
                    "(pip install numba)")
    return _compiled is not None


def step_plan(order: torch.Tensor, position: torch.Tensor, thr_old: torch.Tensor, k_old: int, s_old: int,
              k: int, s: int, Bt: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(thr, (crow, atoms, cols, values))`` of :func:`_step_plan` as tensors (``thr``: d_out x 1 int32;
    ``crow`` int64 of length ``k + 1``); CPU tensors only (see :func:`available`)."""
    thr, crow, atoms, cols, values = _compiled(order.numpy(), position.numpy(), thr_old.numpy().reshape(-1),
                                               k_old, s_old, k, s, Bt.numpy())
    return torch.from_numpy(thr)[:, None], tuple(torch.from_numpy(a) for a in (crow, atoms, cols, values))
