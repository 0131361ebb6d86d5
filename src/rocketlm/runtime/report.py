"""Per-layer run-time cost of an allocation: the form each layer runs in, its multiply-adds per token
and its resident bytes, against the dense layer it replaced."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rocketlm.allocation.plan import LayerChoice
from rocketlm.runtime import choose_forms
from rocketlm.runtime.forms import form_bytes, form_flops


@dataclass(frozen=True)
class LayerRunCost:
    name: str
    form: str  # "dense" for a layer the allocation left dense
    flops: int
    dense_flops: int
    resident_bytes: int
    dense_bytes: int


def run_costs(choices: list[LayerChoice], dtype: torch.dtype, device: torch.device | str = "cpu",
              runtime: str = "auto") -> list[LayerRunCost]:
    """What every targeted layer costs at run time with ``runtime`` (``auto``: measured on ``device``; ``compact``:
    by bytes)."""
    element = torch.tensor([], dtype=dtype).element_size()
    shapes = {(c.d_in, c.d_out, c.k, c.s) for c in choices if not c.dense}
    forms = choose_forms(shapes, dtype, device, runtime=runtime)
    rows = []
    for c in choices:
        dense_bytes = c.d_in * c.d_out * element
        if c.dense:
            rows.append(LayerRunCost(c.name, "dense", c.dense_flops, c.dense_flops, dense_bytes, dense_bytes))
            continue
        form = forms[(c.d_in, c.d_out, c.k, c.s)]
        form = "factored" if form == "canonical" else form
        rows.append(LayerRunCost(c.name, form, form_flops(form, c.d_in, c.d_out, c.k, c.s), c.dense_flops,
                                 form_bytes(form, c.d_in, c.d_out, c.k, c.s, element), dense_bytes))
    return rows
