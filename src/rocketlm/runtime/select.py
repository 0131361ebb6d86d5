"""Which run-time form each compressed layer runs in: chosen once, from timings measured on the device.

The cost model is a table of measured seconds per call, per layer shape ``(d_in, d_out, k, s)`` and
dtype, for a decode-shaped input (1 token) and a prefill-shaped input (``PREFILL_TOKENS`` tokens),
taken with ``torch.utils.benchmark`` (which synchronises CUDA) on random factors of that shape.
A factored form is chosen only where it is faster than ``merged`` (the dense layer's cost) in both
regimes; among those, the one with the smallest summed relative time. (``compact`` times nothing:
:func:`rocketlm.runtime.forms.compact_form`.) The table is cached per
device, torch version, thread count and dtype under the rocketlm cache directory, so a second
load measures nothing.
"""
from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

from rocketlm.compression.modules import SparseDictionaryLinear, pack_mask
from rocketlm.runtime.forms import FORMS, build_form, form_flops
from rocketlm.storage import stable_hash, write_json_atomic

log = logging.getLogger(__name__)

PREFILL_TOKENS = 128
MIN_RUN_TIME_S = 0.02


@dataclass(frozen=True)
class FormTiming:
    form: str
    decode_s: float
    prefill_s: float


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    # the forms measured are part of the key: a table written before a form existed is not reused
    return stable_hash(device.type, name, torch.__version__, torch.get_num_threads(), str(dtype), *FORMS)


def random_layer(d_in: int, d_out: int, k: int, s: int, dtype: torch.dtype, device, seed: int = 0,
                 bias: bool = False) -> SparseDictionaryLinear:
    """A canonical compressed layer of this shape with random factors and a random pattern."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(k, d_out, dtype=torch.bool)
    mask.scatter_(0, torch.rand(k, d_out, generator=gen).argsort(dim=0)[:s], True)
    module = SparseDictionaryLinear(d_in, d_out, k, s, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        module.U.copy_(torch.randn(d_in, k, generator=gen, dtype=torch.float64).to(dtype))
        module.V_values.copy_(torch.randn(s, d_out, generator=gen, dtype=torch.float64).to(dtype))
        module.V_mask.copy_(pack_mask(mask))
        if bias:
            module.bias.copy_(torch.randn(d_out, generator=gen, dtype=torch.float64).to(dtype))
    return module


def _seconds(module: torch.nn.Module, x: torch.Tensor) -> float:
    timer = benchmark.Timer(stmt="module(x)", globals={"module": module, "x": x}, num_threads=torch.get_num_threads())
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S).median


def measure_shape(d_in: int, d_out: int, k: int, s: int, dtype: torch.dtype, device) -> list[FormTiming]:
    """Measured seconds per call of every form that could beat the dense layer (by multiply-adds)."""
    source = random_layer(d_in, d_out, k, s, dtype, device)
    x_decode = torch.randn(1, 1, d_in, dtype=dtype, device=device)
    x_prefill = torch.randn(1, PREFILL_TOKENS, d_in, dtype=dtype, device=device)
    timings = []
    for form in FORMS:
        if form != "merged" and form_flops(form, d_in, d_out, k, s) >= d_in * d_out:
            continue
        module = build_form(source, form)
        timings.append(FormTiming(form, _seconds(module, x_decode), _seconds(module, x_prefill)))
    return timings


# A form replaces ``merged`` only when its measured time is at most this share of merged's, at decode and at
# prefill. With the bare "no slower than merged" rule, SmolLM2 at 20% removed ran 1-12% slower than dense
# with 2 threads (bench/bench_inference.py); the likely cause is what per-layer timings miss inside the
# model (one more activation written and read, one more thread fork/join per layer).
FORM_MARGIN = 0.9


def choose_form(timings: list[FormTiming], margin: float = FORM_MARGIN) -> str:
    """The fastest form that takes at most ``margin`` x ``merged``'s time at decode and at prefill, else
    ``merged``."""
    merged = next(t for t in timings if t.form == "merged")
    best, best_score = "merged", 2.0
    for t in timings:
        if (t.form == "merged" or t.decode_s > margin * merged.decode_s
                or t.prefill_s > margin * merged.prefill_s):
            continue
        score = t.decode_s / merged.decode_s + t.prefill_s / merged.prefill_s
        if score < best_score:
            best, best_score = t.form, score
    return best


class FormTable:
    """Measured timings per layer shape on one device, persisted as JSON (``None`` path: in memory)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None):
        self.device, self.dtype = device, dtype
        self.path = None if cache_dir is None else Path(cache_dir) / "runtime" / f"{device_key(device, dtype)}.json"
        self.entries: dict[str, list[FormTiming]] = {}
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            self.entries = {key: [FormTiming(**t) for t in rows] for key, rows in data["shapes"].items()}

    def timings(self, d_in: int, d_out: int, k: int, s: int) -> list[FormTiming]:
        key = f"{d_in}x{d_out}:k{k}:s{s}"
        if key not in self.entries:
            self.entries[key] = measure_shape(d_in, d_out, k, s, self.dtype, self.device)
        return self.entries[key]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"device": str(self.device), "dtype": str(self.dtype),
                                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "shapes": {k: [asdict(t) for t in v] for k, v in self.entries.items()}})
