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
and the weight residual ``S^-1 Q (B - F C)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class WhiteningError(RuntimeError):
    """The Gram matrix cannot be whitened (non-finite values)."""


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

    Attributes (shapes): ``W`` d_in x d_out, ``S`` d_in x d_in (upper), ``B`` r x d_out
    (``Sigma V^T``), ``SinvQ`` d_in x r (``S^-1 Q``, maps coordinates back to the original
    space), ``H`` r x r (``SinvQ^T SinvQ``, metric of the weight error), ``atom_weight`` r
    (``||S^-1 q_i||^power``, the importance factor of each atom).
    """

    W: torch.Tensor
    B: torch.Tensor
    SinvQ: torch.Tensor
    H: torch.Tensor
    atom_weight: torch.Tensor
    norm_W: float
    norm_M: float

    @property
    def rank(self) -> int:
        return self.B.shape[0]


def layer_basis(W: torch.Tensor, S: torch.Tensor, importance_power: float = 0.5,
                dtype: torch.dtype = torch.float32) -> LayerBasis:
    """Whitened SVD of one layer. ``W``: d_in x d_out; ``S``: upper whitening factor (float64)."""
    W64 = W.to(torch.float64)
    M = S @ W64
    Q, sigma, Vt = torch.linalg.svd(M, full_matrices=False)
    B = sigma[:, None] * Vt
    SinvQ = torch.linalg.solve_triangular(S, Q, upper=True)
    H = SinvQ.T @ SinvQ
    atom_weight = SinvQ.norm(dim=0) ** importance_power
    return LayerBasis(
        W=W64.to(dtype), B=B.to(dtype), SinvQ=SinvQ.to(dtype), H=H.to(dtype),
        atom_weight=atom_weight.to(dtype),
        norm_W=float(W64.norm()), norm_M=float(sigma.norm()),
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
    """
    if not 1 <= s <= k <= basis.rank:
        raise ValueError(f"invalid candidate k={k}, s={s} for a layer of rank {basis.rank}")
    C = basis.B[:k] * _column_mask(basis, k, s)
    G0 = C @ C.T  # k x k
    P = basis.B @ C.T  # r x k
    F = _refit_dictionary(P, G0, ridge_rel)
    # ||R||^2 and tr(R^T H R) for R = B - F C, expanded so that no r x d_out product is formed:
    # ||R||^2 = ||B||^2 - 2<F, P> + <F^T F, C C^T>;  tr(R^T H R) = ||W||^2 - 2<H F, P> + <F^T H F, C C^T>
    HF = basis.H @ F
    err_o2 = basis.norm_M ** 2 - 2.0 * _dot(F, P) + _dot(F.T @ F, G0)
    err_w2 = basis.norm_W ** 2 - 2.0 * _dot(HF, P) + _dot(F.T @ HF, G0)
    result = Factorization(k=k, s=s, error_weight=math.sqrt(max(err_w2, 0.0)) / basis.norm_W,
                           error_output=math.sqrt(max(err_o2, 0.0)) / basis.norm_M)
    if with_factors:
        result.U = basis.SinvQ @ F
        result.V = C
        result.mask = C != 0
    return result


def _column_mask(basis: LayerBasis, k: int, s: int) -> torch.Tensor:
    """k x d_out boolean mask: in every column, the ``s`` atoms of largest ``|C_ij| * atom_weight_i``."""
    if s >= k:
        return torch.ones(k, basis.B.shape[1], dtype=torch.bool, device=basis.B.device)
    importance_T = (basis.B[:k].T.abs() * basis.atom_weight[:k]).contiguous()  # d_out x k, rows contiguous
    mask_T = torch.zeros_like(importance_T, dtype=torch.bool)
    mask_T.scatter_(1, importance_T.topk(s, dim=1, sorted=False).indices, True)
    return mask_T.T


def _dot(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Frobenius inner product accumulated in float64."""
    return float((X.to(torch.float64) * Y.to(torch.float64)).sum())


def _refit_dictionary(P: torch.Tensor, G0: torch.Tensor, ridge_rel: float) -> torch.Tensor:
    """Least squares with the mask fixed: ``F = P (G0 + r I)^-1`` with ``P = B C^T``, ``G0 = C C^T``.

    Solved in float64 (k x k) with ``r = ridge_rel * mean(diag(G0))``. When ``G0 + r I`` is
    singular (an atom kept no entry), ``r`` grows from ``1e-9 * mean(diag)`` until it is not.
    """
    G = G0.to(torch.float64)
    scale = float(G.diagonal().mean()) or 1.0
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    ridge = ridge_rel * scale
    L, info = torch.linalg.cholesky_ex(G + ridge * eye)
    step = 1e-9
    while info.item() != 0:
        ridge = max(ridge * 10.0, step * scale)
        L, info = torch.linalg.cholesky_ex(G + ridge * eye)
    F = torch.cholesky_solve(P.to(torch.float64).T, L).T
    return F.to(P.dtype)


def direct_errors(W: torch.Tensor, S: torch.Tensor, W_hat: torch.Tensor) -> tuple[float, float]:
    """Both relative errors computed from their definitions (float64), for checks:
    ``||W - W_hat|| / ||W||`` and ``||S W - S W_hat|| / ||S W||``."""
    W, W_hat = W.to(torch.float64), W_hat.to(torch.float64)
    e_w = float((W - W_hat).norm() / W.norm())
    e_o = float((S @ (W - W_hat)).norm() / (S @ W).norm())
    return e_w, e_o
