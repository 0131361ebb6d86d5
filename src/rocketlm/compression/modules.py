"""The compressed linear module: ``y = (x U) V + b`` with ``V`` column-sparse.

``V`` (k x d_out) has exactly ``s`` nonzeros per column. It is held compactly: ``V_values``
(s x d_out, column j's nonzeros in increasing row order) and ``V_rows`` (their row indices,
int16 when k fits, else int32). On disk the positions are a packed bitmap (see checkpoint).
"""
from __future__ import annotations

import torch
from torch import nn


def index_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32


class SparseDictionaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, k: int, s: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.U = nn.Parameter(torch.empty(in_features, k, dtype=dtype, device=device), requires_grad=False)
        self.V_values = nn.Parameter(torch.empty(s, out_features, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("V_rows", torch.empty(s, out_features, dtype=index_dtype(k), device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor, s: int,
                     bias: torch.Tensor | None, dtype: torch.dtype) -> "SparseDictionaryLinear":
        """Build from dense factors: ``U`` d_in x k, ``V`` k x d_out with ``mask`` marking ``s`` entries per column."""
        d_in, k = U.shape
        d_out = V.shape[1]
        counts = mask.sum(dim=0)
        if not bool((counts == s).all()):
            raise ValueError(f"V must have exactly {s} nonzeros per column, got {counts.min()}..{counts.max()}")
        rows = rows_from_mask(mask, s)
        module = cls(d_in, d_out, k, s, bias=bias is not None, dtype=dtype, device=U.device)
        module.U.data.copy_(U.to(dtype))
        module.V_values.data.copy_(torch.gather(V, 0, rows).to(dtype))
        module.V_rows.copy_(rows.to(module.V_rows.dtype))
        if bias is not None:
            module.bias.data.copy_(bias.to(dtype))
        return module

    def dense_V(self) -> torch.Tensor:
        V = torch.zeros(self.k, self.out_features, dtype=self.V_values.dtype, device=self.V_values.device)
        return V.scatter_(0, self.V_rows.long(), self.V_values)

    def dense_weight(self) -> torch.Tensor:
        """``W_hat^T`` in ``nn.Linear.weight`` layout (out x in), for export and checks."""
        return (self.U @ self.dense_V()).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.U) @ self.dense_V()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"


def rows_from_mask(mask: torch.Tensor, s: int) -> torch.Tensor:
    """Row indices (s x d_out, increasing within each column) of a k x d_out mask with s entries per column."""
    d_out = mask.shape[1]
    return torch.nonzero(mask.T, as_tuple=False)[:, 1].reshape(d_out, s).T.contiguous()


def mask_from_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(k, rows.shape[1], dtype=torch.bool, device=rows.device)
    return mask.scatter_(0, rows.long(), True)
