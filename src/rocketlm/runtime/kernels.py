"""Compiled loops (CPU, numba) of the ``packed`` run-time form: ``V`` held as its nonzeros only.

The packed form keeps, per output column ``j``, the ``s`` kept coefficients and the index of their atom (one byte
where ``k <= 256``, else two), and no zeros: the fewest resident bytes of any exact form wherever ``ks`` exceeds
1.25 (one-byte indices) or 1.5 (two-byte ones). Neither product has a torch kernel at that layout: torch's CSR
product needs int32/int64 indices (2-4x the bytes of the one-byte index) and runs far below GEMM speed, and a
per-call scatter into a dense ``V`` costs as much as the product at one token. So:

* a few tokens (decode): each output is a dot product of the column's values with the atoms' activations it
  gathers (:func:`gather_product`), ``s`` multiply-adds per output instead of ``k``;
* more tokens (prefill): the column-sparse ``V`` is written into a scratch buffer (:func:`scatter_dense`), then one
  GEMM; the scatter is ``k x d_out`` writes against the GEMM's ``tokens x k x d_out`` multiply-adds.

Both run on the calling thread and release the GIL. Builds that split the rows over numba's threads
(``parallel=True``) were measured and not kept: inside the model, with torch's threads beside numba's on 2 cores,
they decoded no faster (SmolLM2-135M at 50%, 2 threads: 0.85-0.86x the dense model's decode against 0.89x on one
thread) and prefilled no faster (1.09x against 1.12x). Other devices, dtypes numba does not compile (float16,
bfloat16) and installs without numba take torch's path in :class:`rocketlm.runtime.forms.PackedLinear`, with the
same results.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # a dependency; missing only where installed without it (--no-deps)
    numba = None

COMPILED_DTYPES = (torch.float32, torch.float64)


def _gather_product(z, values, atoms, out, zero):  # pragma: no cover (compiled)
    """``out[i, j] = sum_t values[j, t] * z[i, atoms[j, t]]`` (z: tokens x k; values, atoms: d_out x s); ``zero``
    in the values' dtype (an accumulator promoted to float64 halves the float32 loop's speed)."""
    d_out, s = values.shape
    for i in range(z.shape[0]):
        for j in range(d_out):
            acc = zero
            for t in range(s):
                acc += values[j, t] * z[i, atoms[j, t]]
            out[i, j] = acc


def _scatter_dense(values, atoms, dense):  # pragma: no cover (compiled)
    """``dense`` (d_out x k) = 0, then ``dense[j, atoms[j, t]] = values[j, t]``."""
    d_out, s = values.shape
    for j in range(d_out):
        row = dense[j]
        row[:] = 0
        for t in range(s):
            row[atoms[j, t]] = values[j, t]


# compiled on first use (then cached on disk); fastmath lets the dot products vectorise (their sums are reassociated)
if numba is not None:
    _gather = numba.njit(nogil=True, cache=True, fastmath=True)(_gather_product)
    _scatter = numba.njit(nogil=True, cache=True)(_scatter_dense)
else:
    _gather = _scatter = None


def available(t: torch.Tensor) -> bool:
    """Whether the compiled loops run for ``t`` (a CPU tensor of a compiled dtype, numba installed). They are not
    differentiable: the caller takes torch's path where a gradient is asked for."""
    return _gather is not None and t.device.type == "cpu" and t.dtype in COMPILED_DTYPES


def gather_product(z: torch.Tensor, values: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``z (tokens x k) -> tokens x d_out``; CPU tensors (see :func:`available`)."""
    out = torch.empty(z.shape[0], values.shape[0], dtype=values.dtype)
    v = values.numpy()
    _gather(np.ascontiguousarray(z.numpy()), v, atoms.numpy(), out.numpy(), v.dtype.type(0))
    return out


def scatter_dense(values: torch.Tensor, atoms: torch.Tensor, dense: torch.Tensor) -> None:
    """Write the column-sparse ``V^T`` (d_out x k) into ``dense``, a contiguous CPU tensor."""
    _scatter(values.numpy(), atoms.numpy(), dense.numpy())
