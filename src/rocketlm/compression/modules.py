"""The compressed linear layer in its canonical (stored) form: ``y = (x U) V + b`` with ``V`` column-sparse.

``V`` (k x d_out) has exactly ``s`` nonzeros per column, held as ``V_values`` (s x d_out, column
j's nonzeros in increasing row order) and ``V_mask``, the k x d_out nonzero pattern packed into
bits (uint8, most significant bit first, as ``numpy.packbits``). The state dict holds exactly the
tensors of a checkpoint (``U``, ``V_values``, ``V_mask``, ``bias``), so loading is by name.

This form is for storage and checks; :mod:`rocketlm.runtime` turns it into the form that runs
fastest on the device (its forward here rebuilds ``V`` on every call). :func:`replace_module` is the one
place a module of a model is swapped (compression, checkpoint loading, run-time forms, densify).
"""
from __future__ import annotations

import torch
from torch import nn

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> its row-major bits packed into uint8 (MSB first, zero padded), on the same device."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a ``rows x cols`` bool tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: rows * cols]
    return flat.reshape(rows, cols).bool()


def packed_mask_numel(k: int, d_out: int) -> int:
    return (k * d_out + 7) // 8


def rows_from_mask(mask: torch.Tensor, s: int) -> torch.Tensor:
    """Row indices (s x d_out, int64, increasing within each column) of a k x d_out mask with s entries per column."""
    d_out = mask.shape[1]
    return torch.nonzero(mask.T, as_tuple=False)[:, 1].reshape(d_out, s).T.contiguous()


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` at dotted path ``name`` of ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


class SparseDictionaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, k: int, s: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.U = nn.Parameter(torch.empty(in_features, k, dtype=dtype, device=device), requires_grad=False)
        self.V_values = nn.Parameter(torch.empty(s, out_features, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("V_mask", torch.empty(packed_mask_numel(k, out_features), dtype=torch.uint8,
                                                   device=device))
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
        module = cls(d_in, d_out, k, s, bias=bias is not None, dtype=dtype, device=U.device)
        module.U.data.copy_(U.to(dtype))
        module.V_values.data.copy_(torch.gather(V, 0, rows_from_mask(mask, s)).to(dtype))
        module.V_mask.copy_(pack_mask(mask))
        if bias is not None:
            module.bias.data.copy_(bias.to(dtype))
        return module

    def mask(self) -> torch.Tensor:
        return unpack_mask(self.V_mask, self.k, self.out_features)

    def rows(self) -> torch.Tensor:
        return rows_from_mask(self.mask(), self.s)

    def dense_V(self) -> torch.Tensor:
        V = torch.zeros(self.k, self.out_features, dtype=self.V_values.dtype, device=self.V_values.device)
        return V.scatter_(0, self.rows(), self.V_values)

    def dense_weight(self) -> torch.Tensor:
        """``W_hat^T`` in ``nn.Linear.weight`` layout (out x in), for export and checks."""
        return (self.U @ self.dense_V()).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.U) @ self.dense_V()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"
