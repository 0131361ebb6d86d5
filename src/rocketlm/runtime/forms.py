"""Run-time forms of a compressed layer. Each computes exactly ``x @ W_hat.T + b`` with
``W_hat^T = U V`` from the canonical :class:`~rocketlm.compression.modules.SparseDictionaryLinear`:

* ``factored``: ``V`` held once as a dense ``d_out x k`` matrix (its zeros stored), two GEMMs in
  ``nn.Linear`` layout; ``d_in*k + k*d_out`` multiply-adds per token.
* ``sparse``: ``V^T`` as a CSR matrix (int32 indices), a GEMM then a sparse-dense product;
  ``d_in*k + s*d_out`` multiply-adds per token, but sparse kernels run far below GEMM speed.
* ``merged``: ``W_hat`` as a plain ``nn.Linear``: exactly the dense layer's cost.

``factored`` and ``sparse`` keep the packed nonzero pattern so that their state dict is the
canonical one (``U``, ``V_values``, ``V_mask``, ``bias``): ``save_pretrained`` writes the compact
checkpoint whatever form runs. ``merged`` cannot give the factors back and saves ``weight``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rocketlm.compression.modules import SparseDictionaryLinear, rows_from_mask, unpack_mask

FORMS = ("factored", "sparse", "merged")

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def form_flops(form: str, d_in: int, d_out: int, k: int, s: int) -> int:
    """Multiply-adds per token of ``form`` for a layer of this shape."""
    if form == "merged":
        return d_in * d_out
    return d_in * k + (k if form == "factored" else s) * d_out


def form_bytes(form: str, d_in: int, d_out: int, k: int, s: int, value_bytes: int) -> int:
    """Resident bytes of ``form``'s weights (bias excluded: every form holds it)."""
    mask = (k * d_out + 7) // 8
    if form == "merged":
        return d_in * d_out * value_bytes
    if form == "factored":
        return (d_in * k + k * d_out) * value_bytes + mask
    return (d_in * k + s * d_out) * value_bytes + s * d_out * 4 + (d_out + 1) * 4 + mask  # int32 CSR indices


class _Factors(nn.Module):
    """Shared part of the factored forms: ``down`` (k x d_in, ``U^T``), the pattern, the bias."""

    def __init__(self, source: SparseDictionaryLinear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.k, self.s = source.k, source.s
        self.down = nn.Parameter(source.U.detach().T.contiguous(), requires_grad=False)
        self.register_buffer("V_mask", source.V_mask.detach().clone(), persistent=False)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)

    def rows(self) -> torch.Tensor:
        return rows_from_mask(unpack_mask(self.V_mask, self.k, self.out_features), self.s)

    def dense_V(self) -> torch.Tensor:  # k x d_out
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Write the canonical compact tensors, whatever the run-time layout."""
        destination[prefix + "U"] = self.down.detach().T
        destination[prefix + "V_values"] = torch.gather(self.dense_V(), 0, self.rows())
        destination[prefix + "V_mask"] = self.V_mask
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"


class FactoredLinear(_Factors):
    form = "factored"

    def __init__(self, source: SparseDictionaryLinear):
        super().__init__(source)
        self.up = nn.Parameter(source.dense_V().detach().T.contiguous(), requires_grad=False)  # d_out x k

    def dense_V(self) -> torch.Tensor:
        return self.up.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)


class SparseFactoredLinear(_Factors):
    form = "sparse"

    def __init__(self, source: SparseDictionaryLinear):
        super().__init__(source)
        Vt = source.dense_V().detach().T  # d_out x k, s nonzeros per row
        rows = source.rows().T.contiguous()  # d_out x s, increasing
        values = torch.gather(Vt, 1, rows)
        crow = torch.arange(0, (self.out_features + 1) * self.s, self.s, dtype=torch.int32, device=Vt.device)
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", rows.reshape(-1).to(torch.int32), persistent=False)
        self.values = nn.Parameter(values.reshape(-1).contiguous(), requires_grad=False)

    def _csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.k),
                                       check_invariants=False)

    def dense_V(self) -> torch.Tensor:
        return self._csr().to_dense().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.down)  # ... x k
        flat = z.reshape(-1, self.k)
        y = (self._csr() @ flat.T).T.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def merged_linear(source: SparseDictionaryLinear) -> nn.Linear:
    linear = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None,
                       dtype=source.U.dtype, device=source.U.device)
    with torch.no_grad():
        linear.weight.copy_(source.dense_weight())
        if source.bias is not None:
            linear.bias.copy_(source.bias)
    return linear.requires_grad_(False)


def build_form(source: SparseDictionaryLinear, form: str) -> nn.Module:
    if form == "factored":
        return FactoredLinear(source)
    if form == "sparse":
        return SparseFactoredLinear(source)
    if form == "merged":
        return merged_linear(source)
    raise ValueError(f"unknown runtime form {form!r}; choose one of {', '.join(FORMS)}")
