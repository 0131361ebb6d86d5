"""The ROCKET factorization of one linear layer (ROCKET.md sections 1-4), as pure tensor functions.

Notation (ROCKET.md): ``W`` is ``d_in x d_out`` (the transpose of ``nn.Linear.weight``),
``A = X^T X`` the input Gram, ``S`` its upper Cholesky factor (``A = S^T S``) and
``M = S W`` the whitened weight. A candidate keeps a dictionary of ``k`` atoms and ``s``
nonzeros per coefficient column; ``W_hat = U V`` with ``U = S^-1 D`` and ``V = C``.

The same function, :func:`factorize_candidate`, serves profiling and final compression,
so the error that drives the allocation is the error of the factors that ship.

Work shared by all candidates of a layer (one whitening, one SVD) lives in
:class:`LayerBasis`. With the thin SVD ``M = Q B`` (``Q`` orthonormal ``d_in x r``,
``B = Sigma V^T``), the basis of ROCKET.md 3.1 is ``Q[:, :k]`` and ``C = Q_k^T M = B[:k]``.
Every quantity of a candidate is computed in these ``r``-dimensional coordinates:
``D = Q F`` with ``F = B C^T (C C^T + r I)^-1``; the whitened residual is ``Q (B - F C)``
and the weight residual ``S^-1 Q (B - F C)``. A candidate costs two GEMMs over ``d_out``
(``C C^T`` and ``B C^T``), one ``k x k`` Cholesky factorization, one triangular solve and one
``k x r x r`` product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rocketlm.errors import WhiteningError  # noqa: F401  (re-exported)




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
    A = 0.5 * (A + A.T)
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        lam_min = torch.linalg.eigvalsh(A)[0].item()
        shift = eps - lam_min if lam_min < eps else eps
        A = A + shift * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        L = torch.linalg.cholesky(A)
    return L.T.contiguous()


@dataclass
class LayerBasis:
    """Per-layer work shared by every candidate.

    Attributes (shapes): ``W`` d_in x d_out, ``B`` r x d_out (``Sigma V^T``, rows orthogonal),
    ``SinvQ`` d_in x r (``S^-1 Q``, maps coordinates back to the original space), ``H`` r x r
    (``SinvQ^T SinvQ``, metric of the weight error), ``atom_weight`` r (``||S^-1 q_i||^power``, the
    importance factor of each atom), ``row_sq`` r (float64 ``||b_i||^2`` = ``sigma_i^2``),
    ``order`` d_out x r (per column of ``B``, the atoms by decreasing importance
    ``|B_ij| * atom_weight_i``; sorted once, every candidate's mask is read from it).
    """

    W: torch.Tensor
    B: torch.Tensor
    SinvQ: torch.Tensor
    H: torch.Tensor
    atom_weight: torch.Tensor
    row_sq: torch.Tensor
    order: torch.Tensor
    norm_W: float
    norm_M: float

    @property
    def rank(self) -> int:
        return self.B.shape[0]


# Above this condition number of M the Gram-eigenvector route loses accuracy: use the SVD instead.
_EIGH_MAX_CONDITION = 1e5


def _descending_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the eigenvalues (clamped at 0) and eigenvectors of a symmetric ``G``, largest first."""
    lam, vecs = torch.linalg.eigh(G)
    return lam.flip(0).clamp_min(0).sqrt(), vecs.flip(1)


def _whitened_svd(M: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, SinvQ)`` of the thin SVD ``M = Q diag(sigma) V^T`` (float64, largest first):
    ``B = diag(sigma) V^T`` and ``SinvQ = S^-1 Q``.

    Computed from the eigendecomposition of the smaller Gram of ``M`` (``M M^T`` or ``M^T M``;
    ROCKET.md 3.1: "equivalently eigenvectors of M M^T"), about 3x faster than an SVD on CPU.
    ``B = Q^T M`` is formed from ``Q`` itself, so ``M = Q B`` holds to rounding. A badly
    conditioned ``M`` falls back to ``torch.linalg.svd``.
    """
    d_in, d_out = M.shape
    if d_in <= d_out:
        sigma, Q = _descending_eigh(M @ M.T)
        if sigma[-1] * _EIGH_MAX_CONDITION > sigma[0]:
            return Q.T @ M, torch.linalg.solve_triangular(S, Q, upper=True)
    else:
        sigma, V = _descending_eigh(M.T @ M)
        if sigma[-1] * _EIGH_MAX_CONDITION > sigma[0]:
            # Q = M V / sigma, so S^-1 Q = W V / sigma: no triangular solve needed
            return sigma[:, None] * V.T, (W @ V) / sigma
    Q, sigma, Vt = torch.linalg.svd(M, full_matrices=False)
    return sigma[:, None] * Vt, torch.linalg.solve_triangular(S, Q, upper=True)


def layer_basis(W: torch.Tensor, S: torch.Tensor, importance_power: float = 0.5,
                dtype: torch.dtype = torch.float32) -> LayerBasis:
    """Whitened SVD of one layer. ``W``: d_in x d_out; ``S``: upper whitening factor (float64)."""
    W64 = W.to(torch.float64)
    M = S @ W64
    B, SinvQ = _whitened_svd(M, W64, S)
    H = SinvQ.T @ SinvQ
    atom_weight = (SinvQ.norm(dim=0) ** importance_power).to(dtype)
    row_sq = B.square().sum(dim=1)
    B = B.to(dtype)
    importance_T = B.T.abs() * atom_weight  # d_out x r
    return LayerBasis(
        W=W64.to(dtype), B=B, SinvQ=SinvQ.to(dtype), H=H.to(dtype),
        atom_weight=atom_weight, row_sq=row_sq,
        order=importance_T.argsort(dim=1, descending=True, stable=True),
        norm_W=float(W64.norm()), norm_M=float(M.norm()),
    )


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
        err_o2 = float(tail.sum())
        err_w2 = float((basis.H.diagonal()[k:].to(torch.float64) * tail).sum())
        result = _result(basis, k, s, err_w2, err_o2)
        if with_factors:
            result.U = basis.SinvQ[:, :k].clone()
            result.V = basis.B[:k].clone()
            result.mask = torch.ones_like(result.V, dtype=torch.bool)
        return result
    C = basis.B[:k] * _column_mask(basis, k, s)
    G0 = C @ C.T  # k x k
    P = basis.B @ C.T  # r x k
    err_w2, err_o2, F = _refit_errors(basis, P, G0, ridge_rel, with_factors)
    result = _result(basis, k, s, err_w2, err_o2)
    if with_factors:
        result.U = basis.SinvQ @ F
        result.V = C
        result.mask = C != 0
    return result


def _result(basis: LayerBasis, k: int, s: int, err_w2: float, err_o2: float) -> Factorization:
    return Factorization(k=k, s=s, error_weight=math.sqrt(max(err_w2, 0.0)) / basis.norm_W,
                         error_output=math.sqrt(max(err_o2, 0.0)) / basis.norm_M)


def _column_mask(basis: LayerBasis, k: int, s: int) -> torch.Tensor:
    """k x d_out boolean mask: in every column, the ``s`` atoms of largest ``|C_ij| * atom_weight_i``.

    Read from the per-layer sort: in each column, the first ``s`` atoms of ``order`` below ``k``
    (ties go to the lower atom index).
    """
    if s >= k:
        return torch.ones(k, basis.B.shape[1], dtype=torch.bool, device=basis.B.device)
    in_dictionary = basis.order < k
    chosen = in_dictionary & (in_dictionary.cumsum(dim=1, dtype=torch.int32) <= s)
    mask_T = torch.zeros(basis.order.shape, dtype=torch.bool, device=basis.B.device)
    mask_T.scatter_(1, basis.order, chosen)
    return mask_T[:, :k].T


def _dot(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Frobenius inner product accumulated in float64."""
    return float((X.to(torch.float64) * Y.to(torch.float64)).sum())


def _refit_errors(basis: LayerBasis, P: torch.Tensor, G0: torch.Tensor, ridge_rel: float,
                  with_factors: bool) -> tuple[float, float, torch.Tensor | None]:
    """Squared errors ``(||W - W_hat||^2, ||M - M_hat||^2)`` of the refit ``F = P (G0 + r I)^-1``,
    and ``F`` (``r x k``, the profile dtype) when ``with_factors``.

    Solved in float64 with ``r = ridge_rel * mean(diag(G0))``. An atom that kept no entry has a
    zero row in ``C``: its column of ``F`` is set to 0 (it multiplies nothing), which keeps ``G0``
    definite. If ``G0 + r I`` is still singular, ``r`` grows from ``1e-9 * mean(diag)``.

    With ``G = G0 + r I = L L^T`` and ``Y = L^-1 P^T`` (one triangular solve), ``F = Y^T L^-1``
    and ``F G0 = P - r F`` give ``||B - F C||^2 = ||B||^2 - ||Y||^2 - r ||F||^2`` and
    ``tr(R^T H R) = ||W||^2 - tr(Y H Y^T) - r <H F, F>``; the ridge terms need ``F`` itself.
    """
    G = G0.to(torch.float64)
    P64 = P.to(torch.float64)
    inactive = G.diagonal() == 0
    if bool(inactive.any()):
        G = G.clone()
        G.diagonal()[inactive] = 1.0
        P64 = P64.clone()
        P64[:, inactive] = 0.0
    scale = float(G0.diagonal().to(torch.float64).mean()) or 1.0
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    ridge = ridge_rel * scale
    L, info = torch.linalg.cholesky_ex(G + ridge * eye if ridge else G)
    while info.item() != 0:
        ridge = max(ridge * 10.0, 1e-9 * scale)
        L, info = torch.linalg.cholesky_ex(G + ridge * eye)
    Y = torch.linalg.solve_triangular(L, P64.T, upper=False)  # k x r
    YH = Y.to(basis.H.dtype) @ basis.H
    err_o2 = basis.norm_M ** 2 - float(Y.square().sum())
    err_w2 = basis.norm_W ** 2 - _dot(YH, Y)
    F = None
    if with_factors or ridge:
        F = torch.linalg.solve_triangular(L.T, Y, upper=True).T  # r x k
        if ridge:
            HF = basis.H @ F.to(basis.H.dtype)
            err_o2 -= ridge * float(F.square().sum())
            err_w2 -= ridge * _dot(HF, F)
        F = F.to(P.dtype)
    return err_w2, err_o2, F


def direct_errors(W: torch.Tensor, S: torch.Tensor, W_hat: torch.Tensor) -> tuple[float, float]:
    """Both relative errors computed from their definitions (float64), for checks:
    ``||W - W_hat|| / ||W||`` and ``||S W - S W_hat|| / ||S W||``."""
    W, W_hat = W.to(torch.float64), W_hat.to(torch.float64)
    e_w = float((W - W_hat).norm() / W.norm())
    e_o = float((S @ (W - W_hat)).norm() / (S @ W).norm())
    return e_w, e_o
