"""Run-time forms of a compressed layer. Each computes exactly ``x @ W_hat.T + b`` with
``W_hat^T = U V`` from the canonical :class:`~rocketlm.compression.modules.SparseDictionaryLinear`:

* ``factored``: ``V`` held once as a dense ``d_out x k`` matrix (its zeros stored), two GEMMs in
  ``nn.Linear`` layout; ``d_in*k + k*d_out`` multiply-adds per token.
* ``sparse``: ``V^T`` as a CSR matrix (int32 indices), a GEMM then a sparse-dense product;
  ``d_in*k + s*d_out`` multiply-adds per token, but sparse kernels run far below GEMM speed.
* ``packed``: ``V`` as its nonzeros only, with a one- or two-byte atom index each
  (:mod:`rocketlm.runtime.kernels`): the fewest resident bytes beyond ``ks`` 1.25-1.5; a gathered
  product at a few tokens (``d_in*k + s*d_out`` multiply-adds per token), a scatter into a scratch
  ``V`` and a GEMM at more (``d_in*k + k*d_out``, the count reported for it).
* ``merged``: ``W_hat`` as a plain ``nn.Linear``: exactly the dense layer's cost.

The factored forms give the canonical state dict (``U``, ``V_values``, ``V_mask``, ``bias``):
``save_pretrained`` writes the compact checkpoint whatever form runs. ``merged`` cannot give the
factors back and saves ``weight``.
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rocketlm.compression.modules import SparseDictionaryLinear, pack_mask, rows_from_mask, unpack_mask
from rocketlm.runtime import kernels

FORMS = ("factored", "sparse", "packed", "merged")

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def form_flops(form: str, d_in: int, d_out: int, k: int, s: int) -> int:
    """Multiply-adds per token of ``form`` for a layer of this shape."""
    if form == "merged":
        return d_in * d_out
    return d_in * k + (s if form == "sparse" else k) * d_out  # packed: what its prefill runs


def index_bytes(k: int) -> int:
    """Bytes of one atom index of the ``packed`` form."""
    return 1 if k <= 256 else 2 if k <= 32768 else 4


def form_bytes(form: str, d_in: int, d_out: int, k: int, s: int, value_bytes: int) -> int:
    """Resident bytes of ``form``'s weights (bias excluded: every form holds it)."""
    mask = (k * d_out + 7) // 8
    if form == "merged":
        return d_in * d_out * value_bytes
    if form == "factored":
        return (d_in * k + k * d_out) * value_bytes + mask
    if form == "packed":
        return (d_in * k + s * d_out) * value_bytes + s * d_out * index_bytes(k)
    return (d_in * k + s * d_out) * value_bytes + s * d_out * 4 + (d_out + 1) * 4 + mask  # int32 CSR indices


COMPACT_FORMS = ("factored", "packed", "merged")  # candidates of ``compact``, ties going to the first


def compact_form(d_in: int, d_out: int, k: int, s: int, value_bytes: int) -> str:
    """``--runtime compact``: the exact form with the fewest resident bytes for this shape, by arithmetic
    (``packed`` beyond ``ks`` 1.25-1.5, ``factored`` below, ``merged`` where even that holds more than the dense
    layer). Per-layer timings are not asked: measured alone, with its weights hot in cache, a layer's dense GEMV
    looks faster than it runs inside the model (SmolLM2-135M at 50%: with every compressed layer packed the model
    decodes 1.12-1.24x faster than dense at one thread, while timings alone packed 31 of its 159 layers)."""
    return min(COMPACT_FORMS, key=lambda form: form_bytes(form, d_in, d_out, k, s, value_bytes))


class _Factors(nn.Module):
    """Shared part of the factored forms: ``down`` (k x d_in, ``U^T``), the pattern, the bias."""

    def __init__(self, source: SparseDictionaryLinear, keep_mask: bool = True):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.k, self.s = source.k, source.s
        self.down = nn.Parameter(source.U.detach().T.contiguous(), requires_grad=False)
        if keep_mask:
            self.register_buffer("V_mask", source.V_mask.detach().clone(), persistent=False)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)

    def rows(self) -> torch.Tensor:  # s x d_out, increasing
        return rows_from_mask(unpack_mask(self.V_mask, self.k, self.out_features), self.s)

    def mask_bits(self) -> torch.Tensor:
        return self.V_mask

    def dense_V(self) -> torch.Tensor:  # k x d_out
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Write the canonical compact tensors, whatever the run-time layout."""
        destination[prefix + "U"] = self.down.detach().T
        destination[prefix + "V_values"] = torch.gather(self.dense_V(), 0, self.rows())
        destination[prefix + "V_mask"] = self.mask_bits()
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


# Up to this many tokens a packed layer gathers (s multiply-adds per output); beyond, a scratch ``V`` and a GEMM
# win. Measured on SmolLM2-135M's shapes (2-core Xeon, 1 thread): the scatter costs about two tokens' gathers.
GATHER_MAX_TOKENS = 2

_scratch = threading.local()  # per thread: one buffer per (device, dtype), grown to the largest layer's V


def _scratch_V(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = buffers[key] = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
    return buf[: rows * cols].view(rows, cols)


class PackedLinear(_Factors):
    """``V`` held as its nonzeros only: ``values`` (d_out x s) and their atoms (``atoms``, d_out x s, uint8 where
    ``k <= 256``, else int16 or int32), increasing per output. See :mod:`rocketlm.runtime.kernels`."""
    form = "packed"

    def __init__(self, source: SparseDictionaryLinear):
        super().__init__(source, keep_mask=False)
        rows = source.rows().T.contiguous()  # d_out x s
        dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[index_bytes(self.k)]
        self.register_buffer("atoms", rows.to(dtype), persistent=False)
        self.values = nn.Parameter(source.V_values.detach().T.contiguous(), requires_grad=False)

    def rows(self) -> torch.Tensor:
        return self.atoms.T.long()

    def mask_bits(self) -> torch.Tensor:
        mask = torch.zeros(self.k, self.out_features, dtype=torch.bool, device=self.atoms.device)
        return pack_mask(mask.scatter_(0, self.rows(), True))

    def _fill_Vt(self, Vt: torch.Tensor) -> torch.Tensor:
        """``V^T`` (d_out x k) written into ``Vt`` by torch (differentiable in ``values``)."""
        return Vt.zero_().scatter_(1, self.atoms.long(), self.values)

    def dense_V(self) -> torch.Tensor:
        return self._fill_Vt(self.values.new_empty(self.out_features, self.k)).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.down)  # ... x k
        flat = z.reshape(-1, self.k)
        # where a gradient is asked for: torch's differentiable path and a V of its own (autograd keeps it)
        grad = torch.is_grad_enabled() and (flat.requires_grad or self.values.requires_grad)
        compiled = not grad and kernels.available(flat)
        if flat.shape[0] <= GATHER_MAX_TOKENS:
            y = (kernels.gather_product(flat, self.values, self.atoms) if compiled
                 else (self.values * flat[:, self.atoms.long()]).sum(dim=-1))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        if grad:
            return F.linear(z, self.dense_V().T, self.bias)
        Vt = _scratch_V(self.out_features, self.k, self.values)
        if compiled:
            kernels.scatter_dense(self.values, self.atoms, Vt)
        else:
            self._fill_Vt(Vt)
        return F.linear(z, Vt, self.bias)


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
    if form == "packed":
        return PackedLinear(source)
    if form == "merged":
        return merged_linear(source)
    raise ValueError(f"unknown runtime form {form!r}; choose one of {', '.join(FORMS)}")
