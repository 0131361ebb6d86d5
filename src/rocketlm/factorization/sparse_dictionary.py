"""The ROCKET factorization of one linear layer (ROCKET.md sections 1-4), as pure tensor functions.

Notation (ROCKET.md): ``W`` is ``d_in x d_out`` (the transpose of ``nn.Linear.weight``),
``A = X^T X`` the input Gram, ``S`` its upper Cholesky factor (``A = S^T S``) and
``M = S W`` the whitened weight. A candidate keeps a dictionary of ``k`` atoms and ``s``
nonzeros per coefficient column; ``W_hat = U V`` with ``U = S^-1 D`` and ``V = C``.

The same function, :func:`factorize_candidate`, serves profiling and final compression,
so the error that drives the allocation is the error of the factors that ship.

Work shared by all candidates of a layer (one whitening, one eigendecomposition of the Gram of
``M`` and one of the weight metric) lives in :class:`LayerBasis`. With ``M = Q B`` (``Q``
orthonormal ``d_in x r``, ``B = Q^T M`` with orthogonal rows), the basis of ROCKET.md 3.1 is
``Q[:, :k]`` and ``C = Q_k^T M = B[:k]`` (masked). The refit ``D = Q F`` with
``F = B C^T (C C^T)^-1`` projects the rows of ``B`` onto the row space of ``C``, so both errors
are energies left outside that projection: ``||M - M_hat||^2 = ||B||^2 - ||Y||^2`` and
``||W - W_hat||^2 = ||W||^2 - tr(Y H Y^T)`` with ``Y = L^-1 (B C^T)^T``, ``L L^T = C C^T`` and the
weight metric ``H = (S^-1 Q)^T (S^-1 Q)``. With ``H = R diag(h) R^T`` (``R`` orthogonal, once per
layer) and ``B_rot = R^T B``, ``Y R = L^-1 (B_rot C^T)^T`` gives both as column sums of squares:
``tr(Y H Y^T) = sum_j h_j ||(Y R)_j||^2``. A candidate costs two GEMMs over ``d_out``
(``C C^T``, computed as a block upper triangle, and ``B_rot C^T``), one ``k x k`` Cholesky
factorization and one triangular solve with ``r`` right-hand sides.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from rocketlm.errors import WhiteningError  # noqa: F401  (re-exported)
from rocketlm.factorization import step_kernel




def candidate_shape(d_in: int, d_out: int, removed_ratio: float, ks: float) -> tuple[int, int]:
    """Dictionary size ``k`` and nonzeros per column ``s`` of a candidate (ROCKET.md section 2).

    ``k = floor((1 - removed) * P / (d_in + d_out / ks))``, ``s = floor(k / ks)``.
    """
    kept_budget = (1.0 - removed_ratio) * d_in * d_out
    k = int(math.floor(kept_budget / (d_in + d_out / ks) + 1e-9))
    s = int(math.floor(k / ks + 1e-9))
    return k, s


def kept_values(d_in: int, d_out: int, k: int, s: int) -> int:
    """Values stored by a candidate: dense ``U`` (d_in x k) plus ``s`` values per column of ``V``."""
    return d_in * k + d_out * s


def kept_bytes(d_in: int, d_out: int, k: int, s: int, value_bytes: int) -> int:
    """Bytes on disk: the values plus the bitmap of ``V``'s nonzero positions (``k * d_out`` bits)."""
    return kept_values(d_in, d_out, k, s) * value_bytes + math.ceil(k * d_out / 8)


def whitening_factor(A: torch.Tensor, eps: float = 7e-6) -> torch.Tensor:
    """Upper Cholesky factor ``S`` (``A = S^T S``) of a float64 Gram ``A`` (d_in x d_in).

    If ``A`` is not positive definite, ``(eps - lambda_min(A)) I`` is added (ROCKET.md 1).
    """
    A = A.to(torch.float64)
    if not torch.isfinite(A).all():
        raise WhiteningError("Gram matrix contains NaN/Inf values")
    # at most two d_in x d_in temporaries beside the caller's Gram (the widest layer's whitening sets the
    # peak memory of an offloaded run): the symmetrised copy, shifted in place, and the factor
    A = (A + A.T).mul_(0.5)
    S, info = torch.linalg.cholesky_ex(A, upper=True)
    if info.item() != 0:
        del S
        lam_min = torch.linalg.eigvalsh(A)[0].item()
        A.diagonal().add_(eps - lam_min if lam_min < eps else eps)
        S = torch.linalg.cholesky(A, upper=True)
    return S


@dataclass
class LayerBasis:
    """Per-layer work shared by every candidate.

    Attributes (shapes): ``Bt`` d_out x r (``B^T``; ``B = Q^T M``, rows = atoms, orthogonal),
    ``B_rotT`` d_out x r (``(R^T B)^T``: the rows of ``B`` in the eigenbasis ``R`` of the weight metric
    ``H``), ``h_eig`` r (float64 eigenvalues of ``H``), ``R`` r x r, ``SinvQ`` d_in x r (``S^-1 Q``,
    maps coordinates back to the original space), ``h_diag`` r (float64 ``H_ii = ||S^-1 q_i||^2``),
    ``atom_weight`` r (``||S^-1 q_i||^power``, the importance factor of each atom), ``row_sq`` r
    (float64 ``||b_i||^2`` = ``sigma_i^2``), ``order`` d_out x r' (per column of ``B``, the atoms by
    decreasing importance ``|B_ij| * atom_weight_i``, padded with ``r`` to a multiple of
    :data:`_SELECT_BLOCK`), ``position`` d_out x r (int32, where each atom stands in its column's
    ``order``). Every candidate's mask is read from one sort. ``Bt64`` and ``B_rotT64`` are the float64
    originals of ``Bt`` and ``B_rotT`` (the same tensors when the profile dtype is float64).
    """

    Bt: torch.Tensor
    B_rotT: torch.Tensor
    Bt64: torch.Tensor
    B_rotT64: torch.Tensor
    h_eig: torch.Tensor
    R: torch.Tensor
    SinvQ: torch.Tensor
    h_diag: torch.Tensor
    atom_weight: torch.Tensor
    row_sq: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    norm_W: float
    norm_M: float

    @property
    def B(self) -> torch.Tensor:
        """``r x d_out`` coefficients (a view of ``Bt``)."""
        return self.Bt.T

    @property
    def rank(self) -> int:
        return self.Bt.shape[1]


# Above this condition number of M, Q = M V / sigma (the d_in > d_out route) is not orthonormal to
# working precision (its columns' inner products err by about eps * condition^2): Q is then
# re-orthonormalised by a QR factorization instead.
_EIGH_MAX_CONDITION = 1e5
# Width of the position blocks the column selection counts in (see _selected_T).
_SELECT_BLOCK = 32
# The two float32 GEMMs of a candidate round its captured energy by up to about 1e-6 of ||M||^2
# (||W||^2), which moves an error e by about 1e-6 / (2 e): candidates whose float32 error is below
# this are recomputed with float64 GEMMs, so every profiled error stays within about 2.5e-5 of float64.
_REFINE_BELOW = 0.02


def _descending_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the eigenvalues (clamped at 0) and eigenvectors of a symmetric ``G``, largest first."""
    lam, vecs = torch.linalg.eigh(G)
    return lam.flip(0).clamp_min(0).sqrt(), vecs.flip(1)


def _whitened_svd(M: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, SinvQ)`` with ``M = Q B``, ``Q`` (d_in x r) orthonormal spanning the top singular
    directions of ``M`` in order, ``B = Q^T M`` (rows orthogonal) and ``SinvQ = S^-1 Q`` (float64).

    From the eigendecomposition of the smaller Gram of ``M`` (ROCKET.md 3.1: "equivalently
    eigenvectors of M M^T"), about 3x faster than an SVD on CPU:

    * ``d_in <= d_out``: ``Q`` = eigenvectors of ``M M^T``, orthonormal to rounding whatever the
      conditioning, and ``B = Q^T M`` is formed from ``Q`` itself, so ``M = Q B`` holds to rounding;
    * ``d_in > d_out``: with ``M^T M = V diag(sigma^2) V^T``, ``Q = M V / sigma``, ``B = diag(sigma) V^T``
      and ``S^-1 Q = W V / sigma`` (no triangular solve). When ``M`` is badly conditioned, ``Q`` is
      re-orthonormalised: ``M V = Q T`` (QR, ``T`` upper triangular), ``B = T V^T``, ``S^-1 Q = W V T^-1``.
    """
    d_in, d_out = M.shape
    if d_in <= d_out:
        _, Q = _descending_eigh(M @ M.T)
        return Q.T @ M, torch.linalg.solve_triangular(S, Q, upper=True)
    sigma, V = _descending_eigh(M.T @ M)
    if sigma[-1] * _EIGH_MAX_CONDITION > sigma[0]:
        return sigma[:, None] * V.T, (W @ V) / sigma
    T = torch.linalg.qr(M @ V, mode="r").R
    return T @ V.T, torch.linalg.solve_triangular(T, W @ V, upper=True, left=False)


def layer_basis(W: torch.Tensor, S: torch.Tensor, importance_power: float = 0.5,
                dtype: torch.dtype = torch.float32) -> LayerBasis:
    """Whitened basis of one layer. ``W``: d_in x d_out; ``S``: upper whitening factor (float64)."""
    W64 = W.to(torch.float64)
    M = S @ W64
    B, SinvQ = _whitened_svd(M, W64, S)
    H = SinvQ.T @ SinvQ
    h_eig, R = torch.linalg.eigh(H)
    atom_weight = (SinvQ.norm(dim=0) ** importance_power).to(dtype)
    Bt64 = B.T.contiguous()
    B_rotT64 = Bt64 @ R
    Bt = Bt64.to(dtype)
    order, position = _importance_order(Bt, atom_weight)
    return LayerBasis(
        Bt=Bt, B_rotT=B_rotT64.to(dtype), Bt64=Bt64, B_rotT64=B_rotT64, h_eig=h_eig.clamp_min(0), R=R.to(dtype),
        SinvQ=SinvQ.to(dtype),
        h_diag=H.diagonal().clone(), atom_weight=atom_weight, row_sq=B.square().sum(dim=1),
        order=order, position=position, norm_W=float(W64.norm()), norm_M=float(M.norm()),
    )


def _importance_order(Bt: torch.Tensor, atom_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``B`` (row of ``Bt``), the atoms by decreasing ``|B_ij| * atom_weight_i`` (ties: lower
    atom first; int32, padded with ``r`` to a multiple of :data:`_SELECT_BLOCK`) and each atom's position."""
    d_out, r = Bt.shape
    order = _descending_order(Bt.abs() * atom_weight).to(torch.int32)
    position = torch.empty_like(order)
    position.scatter_(1, order.long(), torch.arange(r, dtype=torch.int32, device=Bt.device).expand(d_out, r))
    pad = -r % _SELECT_BLOCK
    if pad:
        order = torch.cat([order, order.new_full((d_out, pad), r)], dim=1)
    return order, position


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """Row-wise argsort by decreasing value, ties to the lower index (a stable sort). On CPU, numpy's
    quicksort (3x faster than a stable sort here), with the rows that hold a tie sorted again stably."""
    if values.device.type != "cpu":
        return values.argsort(dim=1, descending=True, stable=True)
    neg = (-values).numpy()
    order = np.argsort(neg, axis=1)
    ranked = np.take_along_axis(neg, order, axis=1)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.argsort(neg[tied], axis=1, kind="stable")
    return torch.from_numpy(order)


@dataclass
class Factorization:
    """One candidate's factors and errors. ``U``: d_in x k; ``V``: k x d_out with exactly ``s``
    nonzeros per column (``mask`` marks them)."""

    k: int
    s: int
    error_weight: float
    error_output: float
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def factorize_candidate(basis: LayerBasis, k: int, s: int, ridge_rel: float = 0.0,
                        with_factors: bool = False) -> Factorization:
    """Sparse-dictionary factorization of ROCKET.md section 3 and both errors of section 4.

    1. basis ``Q_k``, coefficients ``C = Q_k^T M = B[:k]``;
    2. keep the ``s`` entries of largest ``|C_ij| * ||S^-1 q_i||^p`` in every column;
    3. dictionary refit ``F = B C^T (C C^T + r I)^-1`` (so ``D = Q F``);
    4. ``e_o = ||B - F C|| / ||M||``, ``e_w = sqrt(tr(R^T H R)) / ||W||`` with ``R = B - F C``.

    The errors use identities of the least-squares solution, so no ``r x d_out`` residual is
    formed (see :func:`_refit_errors`). Without sparsity (``s == k``) and without a ridge, the
    refit is the identity (``C C^T = Sigma_k^2``, ``B C^T = [Sigma_k^2; 0]``) and both errors are
    the discarded tail: ``sum_{i>k} sigma_i^2`` and ``sum_{i>k} H_ii sigma_i^2``.
    """
    if not 1 <= s <= k <= basis.rank:
        raise ValueError(f"invalid candidate k={k}, s={s} for a layer of rank {basis.rank}")
    if s >= k and ridge_rel == 0.0:
        tail = basis.row_sq[k:]
        result = _result(basis, k, s, float((basis.h_diag[k:] * tail).sum()), float(tail.sum()))
        if with_factors:
            result.U = basis.SinvQ[:, :k].clone()
            result.V = basis.B[:k].clone()
            result.mask = torch.ones_like(result.V, dtype=torch.bool)
        return result
    kept_T = _selected_T(basis, k, s)
    CT = basis.Bt[:, :k] * kept_T  # d_out x k: C^T
    err_w2, err_o2, F_rot = _refit_errors(basis, _products(basis.B_rotT, CT), ridge_rel, with_factors)
    result = _result(basis, k, s, err_w2, err_o2)
    if CT.dtype != torch.float64 and min(result.error_weight, result.error_output) < _REFINE_BELOW:
        CT64 = basis.Bt64[:, :k] * kept_T
        err_w2, err_o2, F_rot = _refit_errors(basis, _products(basis.B_rotT64, CT64), ridge_rel, with_factors)
        result = _result(basis, k, s, err_w2, err_o2)
    if with_factors:
        result.U = basis.SinvQ @ (basis.R @ F_rot.to(basis.R.dtype))
        result.V = CT.T.contiguous()
        result.mask = kept_T.T.contiguous()
    return result


@dataclass
class ProductState:
    """The products of the candidate last evaluated along a sequence (for profiling: one ks over increasing
    removed ratios): ``k``, ``s``, the selection thresholds ``thr`` (d_out x 1, see :func:`_thresholds`), ``CT``
    (``C^T``, d_out x k, a view with aligned rows: :func:`_aligned_CT`), ``P = B_rot C^T`` (r x k) and
    ``G0 = C C^T`` (k x k), all in the profile dtype (the sparse updates are a few percent of the products, so
    their rounding stays below the first candidate's)."""

    k: int
    s: int
    thr: torch.Tensor
    CT: torch.Tensor
    P: torch.Tensor
    G0: torch.Tensor
    steps: int = 0  # sparse updates since the products were last computed dense

    def copy(self) -> "ProductState":
        """An independent copy (:func:`factorize_next` consumes the state it is given)."""
        CT = _aligned_CT(*self.CT.shape, self.CT)
        CT.copy_(self.CT)
        return ProductState(self.k, self.s, self.thr, CT, self.P.clone(), self.G0.clone(), self.steps)


# A candidate is reached incrementally from the previous one when the entries of C that change are at most
# this share of C: sparse products cost several times a dense GEMM per multiply-add on CPU. Along one ks,
# consecutive removed ratios (step 0.05) change 1-2% of the entries on SmolLM2.
_INCREMENTAL_MAX_SHARE = 0.1

# Sparse updates in a row before the products are computed dense again: each adds its rounding, and a profile along
# one ks of the default grid (14 removed ratios) makes 13; reaching a candidate from another ks's products (the ks
# search, :mod:`rocketlm.profiling.profile`) would otherwise chain them without end.
MAX_SPARSE_STEPS = 13

# Row stride, in elements, of the incremental products' ``C^T`` (its rows start on 64-byte boundaries in float32).
# The sparse x dense product of a step reads rows of ``C^T`` at random; when ``C^T`` does not fit the cache and
# its rows straddle cache lines it runs 2.5x slower (MKL, 1 thread, a 2048 x 8192 layer at k = 1774: 400 ms with
# rows of 1774 values, 160 ms with a stride of 1776; no difference while ``C^T`` fits the cache, as on SmolLM2).
_ROW_ALIGN = 16

# The thresholds and changed entries of a sparse step on CPU by a compiled loop per column
# (:mod:`rocketlm.factorization.step_kernel`: 1.32x faster full-grid profiles on SmolLM2-135M, bit-identical);
# False: torch's vectorised path everywhere, as before 2026-12-07.
COMPILED_STEPS = True


def _aligned_CT(d_out: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """A ``d_out x k`` view (uninitialised) of a new buffer whose rows are :data:`_ROW_ALIGN`-aligned."""
    width = -(-k // _ROW_ALIGN) * _ROW_ALIGN
    return like.new_empty(d_out, width)[:, :k]


# the incremental products build CSR tensors; a filter set once, not warnings.catch_warnings per call, which
# is not thread-safe (layers are profiled on several threads: rocketlm.profiling.run.concurrent_map)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def factorize_next(basis: LayerBasis, k: int, s: int, state: ProductState | None,
                   ridge_rel: float = 0.0) -> tuple[Factorization, ProductState | None]:
    """Both errors of candidate ``(k, s)`` (as :func:`factorize_candidate` computes them, without the
    factors), reusing the products of the previous candidate ``state`` (consumed) when few entries of ``C``
    differ: with ``C_new = C_old + Delta`` (``Delta`` sparse), ``C_new C_new^T = C_old C_old^T +
    Delta C_old^T + C_new Delta^T`` and ``B_rot C_new^T = B_rot C_old^T + B_rot Delta^T`` cost two sparse
    products each instead of the dense GEMMs. Returns the errors and the state for the next candidate.
    """
    if not 1 <= s <= k <= basis.rank:
        raise ValueError(f"invalid candidate k={k}, s={s} for a layer of rank {basis.rank}")
    if s >= k and ridge_rel == 0.0:
        return factorize_candidate(basis, k, s), state
    if state is None or state.steps >= MAX_SPARSE_STEPS:  # dense products: no step to plan
        thr, delta = _thresholds(basis, k, s), None
    else:
        thr, delta = _step_plan(basis, state, k, s)
    if delta is None or delta[1].numel() > _INCREMENTAL_MAX_SHARE * k * thr.shape[0]:  # delta[1]: changed atoms
        CT = torch.mul(basis.Bt[:, :k], basis.position[:, :k] <= thr, out=_aligned_CT(thr.shape[0], k, basis.Bt))
        state = ProductState(k, s, thr, CT, *_products(basis.B_rotT, CT))
    else:
        state = _step_products(basis, state, k, s, thr, delta)
    result = _result(basis, k, s, *_refit_errors(basis, (state.P, state.G0), ridge_rel, False)[:2])
    if state.CT.dtype != torch.float64 and min(result.error_weight, result.error_output) < _REFINE_BELOW:
        P, G0 = _products(basis.B_rotT64, basis.Bt64[:, :k] * (basis.position[:, :k] <= thr))
        result = _result(basis, k, s, *_refit_errors(basis, (P, G0), ridge_rel, False)[:2])
    return result, state


def _delta_entries(basis: LayerBasis, state: ProductState, k: int,
                   thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(atoms, columns, signs)`` of the entries of ``C`` (atoms below ``k``) that differ between the state's
    candidate and the one with thresholds ``thr``: +1 where the new one keeps an entry the old did not, -1
    where it drops one. An atom below both ``k`` changes exactly where its position lies between the two
    thresholds; an atom new to the dictionary enters wherever its position is at most the new threshold."""
    order, device = basis.order, thr.device
    low, high = torch.minimum(state.thr, thr), torch.maximum(state.thr, thr)
    width = int((high - low).max())
    atoms, cols, signs = [], [], []
    if width:
        pos = low + torch.arange(1, width + 1, dtype=low.dtype, device=device)  # d_out x width
        at = order.gather(1, pos.clamp_max(order.shape[1] - 1).long())
        col, j = ((pos <= high) & (at < min(state.k, k))).nonzero(as_tuple=True)
        atoms.append(at[col, j].long())
        cols.append(col)
        signs.append(torch.where(thr[col, 0] > state.thr[col, 0], 1.0, -1.0))
    if k > state.k:
        col, j = (basis.position[:, state.k:k] <= thr).nonzero(as_tuple=True)
        atoms.append(j + state.k)
        cols.append(col)
        signs.append(torch.ones(col.numel(), device=device))
    if not atoms:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, torch.zeros(0, device=device)
    return torch.cat(atoms), torch.cat(cols), torch.cat(signs)


def _step_plan(basis: LayerBasis, state: ProductState, k: int, s: int
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(thr, delta)``: the thresholds of ``(k, s)`` (see :func:`_thresholds`) and the entries of
    ``C_new - C_old`` in CSR order, ``delta = (crow, atoms, cols, values)`` (by atom, then column). On CPU one
    compiled loop per column (:mod:`rocketlm.factorization.step_kernel`, with :data:`COMPILED_STEPS`); else
    vectorised torch (:func:`_thresholds_near`, :func:`_delta_entries`), with the same result."""
    if COMPILED_STEPS and step_kernel.available(basis.order.device):
        return step_kernel.step_plan(basis.order, basis.position, state.thr, state.k, state.s, k, s, basis.Bt)
    thr = _thresholds_near(basis, state, k, s)
    atoms, cols, signs = _delta_entries(basis, state, k, thr)
    values = signs.to(basis.Bt.dtype) * basis.Bt[cols, atoms]  # gathered in the entries' column order: 10x faster
    by_atom = _by_atom(atoms, k)
    atoms, cols, values = atoms[by_atom], cols[by_atom], values[by_atom]
    crow = torch.zeros(k + 1, dtype=torch.long, device=thr.device)
    crow[1:] = torch.bincount(atoms, minlength=k).cumsum(0)
    return thr, (crow, atoms, cols, values)


def _step_products(basis: LayerBasis, state: ProductState, k: int, s: int, thr: torch.Tensor,
                   delta: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> ProductState:
    """The state of candidate ``(k, s)`` (thresholds ``thr``) from the previous ``state`` (updated in place
    where the shapes allow) and the changed entries ``delta`` (CSR order, :func:`_step_plan`).

    ``C_new C_new^T - C_old C_old^T = X + X^T`` with ``X = Delta (C_old + Delta / 2)^T``: one sparse product
    for ``C C^T`` and one for ``B_rot C^T``, each costing (changed entries) x (k or r) multiply-adds."""
    crow, atoms, cols, values = delta
    d_out, k_old = state.CT.shape
    if k <= k_old:
        CT, P, G0 = state.CT[:, :k], state.P[:, :k], state.G0[:k, :k]  # views (rows stay aligned)
    else:
        CT = _aligned_CT(d_out, k, state.CT)
        CT[:, :k_old] = state.CT
        CT[:, k_old:] = 0
        P = torch.cat([state.P, state.P.new_zeros(state.P.shape[0], k - k_old)], dim=1)
        G0 = state.G0.new_zeros(k, k)
        G0[:k_old, :k_old] = state.G0
    D = torch.sparse_csr_tensor(crow, cols, values, (k, d_out), check_invariants=False)  # Delta, k x d_out
    half = 0.5 * values
    CT.index_put_((cols, atoms), half, accumulate=True)  # C_old + Delta / 2
    X = torch.sparse.mm(D, CT)
    CT.index_put_((cols, atoms), half, accumulate=True)  # C_new
    P.T.add_(torch.sparse.mm(D, basis.B_rotT))
    return ProductState(k, s, thr, CT, P, G0.add_(X).add_(X.T), state.steps + 1)


def _by_atom(atoms: torch.Tensor, k: int) -> torch.Tensor:
    """The permutation that puts the changed entries in CSR order: by atom, and within an atom in their column
    order, which :func:`_delta_entries` produces ascending (the order that sorting ``atom * d_out + column`` gave,
    so the products are bit-identical). On CPU a stable radix sort of 16-bit atom indices (numpy): 28 ms -> 5.5 ms
    for the 350k entries of a step on a 2048 x 8192 layer."""
    if atoms.device.type == "cpu" and k <= np.iinfo(np.int16).max:
        return torch.from_numpy(np.argsort(atoms.numpy().astype(np.int16), kind="stable"))
    return torch.sort(atoms, stable=True).indices


def _thresholds_near(basis: LayerBasis, state: ProductState, k: int, s: int) -> torch.Tensor:
    """:func:`_thresholds` of ``(k, s)`` found near the state's: per column, the count ``c`` of atoms below ``k``
    at positions up to the old threshold is the old ``s`` corrected for the atoms that left or entered the
    dictionary, and the new threshold is searched in a window of positions around the old one. Falls back
    to :func:`_thresholds` when a column's threshold lies outside the window."""
    order, old = basis.order, state.thr
    low, high = sorted((k, state.k))
    moved = (basis.position[:, low:high] <= old).sum(dim=1, keepdim=True, dtype=torch.int32)
    c = state.s - moved if k < state.k else state.s + moved
    width = 4 * int((s - c).abs().max()) + 16
    start = (old - width).clamp_min(-1)  # count(start) is known: positions <= start
    pos = start + 1 + torch.arange(2 * width, dtype=start.dtype, device=start.device)  # d_out x 2 width
    below = (order.gather(1, pos.clamp_max(order.shape[1] - 1).long()) < k) & (pos < order.shape[1])
    cum = below.cumsum(dim=1, dtype=torch.int32)
    at_start = c - cum.gather(1, (old - start - 1).long())  # count up to ``start``
    count = at_start + cum
    if bool((at_start >= s).any()) or bool((count[:, -1:] < s).any()):
        return _thresholds(basis, k, s)
    return (start + 1 + (count < s).sum(dim=1, keepdim=True, dtype=torch.int32)).to(torch.int32)


def _result(basis: LayerBasis, k: int, s: int, err_w2: float, err_o2: float) -> Factorization:
    return Factorization(k=k, s=s, error_weight=math.sqrt(max(err_w2, 0.0)) / basis.norm_W,
                         error_output=math.sqrt(max(err_o2, 0.0)) / basis.norm_M)


def _selected_T(basis: LayerBasis, k: int, s: int) -> torch.Tensor:
    """d_out x k boolean mask (``C^T``'s kept entries): in every column, the ``s`` atoms below ``k`` that
    come first in ``order`` (largest ``|C_ij| * atom_weight_i``; ties go to the lower atom index)."""
    if s >= k:
        return torch.ones(basis.Bt.shape[0], k, dtype=torch.bool, device=basis.Bt.device)
    return basis.position[:, :k] <= _thresholds(basis, k, s)


def _thresholds(basis: LayerBasis, k: int, s: int) -> torch.Tensor:
    """d_out x 1: per column, the position in ``order`` of the s-th atom below ``k`` (the kept atoms are
    those below ``k`` at or before it).

    Found by counting atoms below ``k`` per block of :data:`_SELECT_BLOCK` positions, then inside the
    one block that holds it: linear in the layer's size, no per-candidate sort.
    """
    order = basis.order
    d_out, width = order.shape
    counts = (order < k).view(d_out, width // _SELECT_BLOCK, _SELECT_BLOCK).sum(dim=2, dtype=torch.int32)
    cum = counts.cumsum(dim=1, dtype=torch.int32)
    block = (cum < s).sum(dim=1, keepdim=True)  # the block holding the s-th atom below k
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_min(0)), 0)
    offsets = torch.arange(_SELECT_BLOCK, device=order.device)
    in_block = order.gather(1, block * _SELECT_BLOCK + offsets) < k
    inside = (in_block.cumsum(dim=1, dtype=torch.int32) < (s - before)).sum(dim=1, keepdim=True)
    return (block * _SELECT_BLOCK + inside).to(torch.int32)


def _products(B_rotT: torch.Tensor, CT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_rot C^T, C C^T)`` (r x k, k x k). ``C C^T`` as a 2 x 2 block upper triangle (3/4 of the GEMM
    work; the lower block is the transpose of the upper one)."""
    k = CT.shape[1]
    P = B_rotT.T @ CT
    h = k // 2
    G0 = torch.empty(k, k, dtype=CT.dtype, device=CT.device)
    G0[:h] = CT[:, :h].T @ CT
    G0[h:, h:] = CT[:, h:].T @ CT[:, h:]
    G0[h:, :h] = G0[:h, h:].T
    return P, G0


def _refit_errors(basis: LayerBasis, products: tuple[torch.Tensor, torch.Tensor], ridge_rel: float,
                  with_factors: bool) -> tuple[float, float, torch.Tensor | None]:
    """Squared errors ``(||W - W_hat||^2, ||M - M_hat||^2)`` of the refit ``F = P (G0 + r I)^-1``, and
    ``F`` in the eigenbasis of ``H`` (``R^T F``, ``r x k``, the products' dtype) when ``with_factors``.

    ``products = (P, G0) = (B_rot C^T, C C^T)``. Jacobi scaling ``G0 = D G D`` (``D = diag(G0)^1/2``)
    leaves the projection unchanged and makes ``G`` well conditioned (condition numbers of 3 to 30 on
    SmolLM2 where ``G0``'s reach 1e9), so ``G + r D^-2 = L L^T`` and the solve ``Y^T = (P D^-1) L^-T``
    run in the products' dtype. An atom that kept no entry has a zero row in ``C`` and gets
    ``D_ii = G_ii = 1`` (its column of ``F`` is 0). If ``G`` is still singular, ``r`` grows from
    ``1e-9 * mean(diag(G0))``.

    ``F G0 = P - r F`` gives ``||B - F C||^2 = ||B||^2 - ||Y||^2 - r ||F||^2`` and
    ``tr(R^T H R) = ||W||^2 - sum_j h_j ||Y_j||^2 - r sum_j h_j ||F_j||^2`` (``Y_j``, ``F_j``: the rows
    of ``Y^T`` and ``F`` for eigenvector ``j`` of ``H``); the ridge terms need ``F`` itself.
    """
    P, G0 = products
    d2 = G0.diagonal().to(torch.float64)
    scale = float(d2.mean()) or 1.0
    d = torch.where(d2 > 0, d2, 1.0).sqrt()
    inv_d = (1.0 / d).to(P.dtype)
    G = G0 * inv_d[:, None] * inv_d[None, :]
    G.diagonal()[d2 == 0] = 1.0
    ridge = ridge_rel * scale
    L, info = torch.linalg.cholesky_ex(G + torch.diag((ridge / d.square()).to(G.dtype)) if ridge else G)
    while info.item() != 0:
        ridge = max(ridge * 10.0, 1e-9 * scale)
        L, info = torch.linalg.cholesky_ex(G + torch.diag((ridge / d.square()).to(G.dtype)))
    Yt = torch.linalg.solve_triangular(L.T, P * inv_d, upper=True, left=False)  # r x k
    energy = torch.linalg.vector_norm(Yt, dim=1, dtype=torch.float64).square()
    err_o2 = basis.norm_M ** 2 - float(energy.sum())
    err_w2 = basis.norm_W ** 2 - float(basis.h_eig @ energy)
    F = None
    if with_factors or ridge:
        F = torch.linalg.solve_triangular(L, Yt, upper=False, left=False) * inv_d  # r x k
        if ridge:
            f_energy = torch.linalg.vector_norm(F, dim=1, dtype=torch.float64).square()
            err_o2 -= ridge * float(f_energy.sum())
            err_w2 -= ridge * float(basis.h_eig @ f_energy)
    return err_w2, err_o2, F


def direct_errors(W: torch.Tensor, S: torch.Tensor, W_hat: torch.Tensor) -> tuple[float, float]:
    """Both relative errors computed from their definitions (float64), for checks:
    ``||W - W_hat|| / ||W||`` and ``||S W - S W_hat|| / ||S W||``."""
    W, W_hat = W.to(torch.float64), W_hat.to(torch.float64)
    e_w = float((W - W_hat).norm() / W.norm())
    e_o = float((S @ (W - W_hat)).norm() / (S @ W).norm())
    return e_w, e_o
