"""Run-time forms of compressed layers and the per-device choice between them."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.errors import ConfigError
from rocketlm.runtime.forms import (FORMS, FactoredLinear, PackedLinear, SparseFactoredLinear, build_form,
                                    compact_form, form_bytes, form_flops)
from rocketlm.runtime.select import FormTable, choose_form
from rocketlm.storage import default_cache_dir

log = logging.getLogger(__name__)

from rocketlm.config import RUNTIMES  # noqa: E402  (one list for config, CLI and loader)

__all__ = ["RUNTIMES", "FORMS", "FactoredLinear", "PackedLinear", "SparseFactoredLinear", "convert_model",
           "form_bytes", "form_flops", "choose_forms", "plan_forms"]


CHOSEN = ("auto", "compact")  # runtimes chosen per layer shape: from timings on the device, or by bytes


def choose_forms(shapes: set[tuple[int, int, int, int]], dtype: torch.dtype, device: torch.device | str,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False,
                 runtime: str = "auto") -> dict[tuple, str]:
    """Form per layer shape ``(d_in, d_out, k, s)`` under ``runtime``: the fastest measured on ``device`` (``auto``;
    timings cached per device), the fewest resident bytes (``compact``, :func:`rocketlm.runtime.forms.compact_form`),
    or ``runtime`` itself."""
    if runtime not in CHOSEN:
        return {shape: runtime for shape in shapes}
    if runtime == "compact":
        element = torch.tensor([], dtype=dtype).element_size()
        return {shape: compact_form(*shape, element) for shape in shapes}
    table = FormTable(torch.device(device), dtype, Path(cache_dir) if cache_dir else default_cache_dir())
    chosen = {shape: choose_form(table.timings(*shape))
              for shape in tqdm(sorted(shapes), desc="runtime forms (shapes)", disable=not progress)}
    table.save()
    return chosen


def plan_forms(model: torch.nn.Module, runtime: str = "auto", cache_dir: str | os.PathLike | None = None,
               progress: bool = False) -> dict[str, str]:
    """Form per compressed layer: ``runtime`` itself, or one chosen per shape (``auto``: the fastest measured on the
    model's device; ``compact``: the fewest resident bytes)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseDictionaryLinear)}
    if not layers:
        return {}
    shape = {name: (m.in_features, m.out_features, m.k, m.s) for name, m in layers.items()}
    first = next(iter(layers.values()))
    chosen = choose_forms(set(shape.values()), first.U.dtype, first.U.device, cache_dir, progress, runtime)
    return {name: chosen[shape[name]] for name in layers}


def convert_model(model: torch.nn.Module, runtime: str = "auto", cache_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> dict[str, str]:
    """Replace every canonical compressed layer by its run-time form; returns the form per layer."""
    forms = plan_forms(model, runtime, cache_dir, progress)
    for name, form in forms.items():
        if form != "canonical":
            replace_module(model, name, build_form(model.get_submodule(name), form))
    counts = {f: sum(v == f for v in forms.values()) for f in sorted(set(forms.values()))}
    log.info("runtime forms: %s", ", ".join(f"{n} {f}" for f, n in counts.items()) or "no compressed layers")
    return forms
