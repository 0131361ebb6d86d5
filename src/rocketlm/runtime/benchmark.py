"""Run-time figures of a model: prefill and decode throughput, resident weight bytes, peak RSS.

* prefill: one forward of ``batch x prefill_tokens`` tokens with the KV cache on and only the last
  position's logits (what ``generate`` does before its first token);
* decode: ``new_tokens`` greedy steps with the KV cache after a ``prompt_tokens`` prompt, the
  prompt's own forward not timed;
* resident weights: bytes of every distinct parameter and buffer; for the compressed layers also
  their bytes against the dense layers they replace.
Speed ratios are only meaningful between models measured in the same process and interleaved
(:func:`compare_speed`), never across runs.
"""
from __future__ import annotations

import inspect
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from rocketlm.integration.layers import COMPRESSED_TYPES

log = logging.getLogger(__name__)


@dataclass
class SpeedFigures:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_runs_s: list[float] = field(default_factory=list)
    decode_runs_s: list[float] = field(default_factory=list)


@dataclass
class MemoryFigures:
    resident_weight_bytes: int
    targeted_layers_bytes: int  # compressed layers as held (whatever form), dense layers of the targets as is
    targeted_layers_dense_bytes: int  # the same layers if all were dense


def _tokens(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill(model, tokens: int = 512, batch: int = 1, seed: int = 0) -> float:
    """Seconds of one prefill forward."""
    device = next(model.parameters()).device
    ids = _tokens(model.config.vocab_size, batch, tokens, seed).to(device)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


def cache_argument(model) -> str:
    """The name of the KV cache in ``model``'s forward and output: ``cache`` from transformers 5.x (which
    deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def time_decode(model, prompt_tokens: int = 128, new_tokens: int = 64, seed: int = 0) -> float:
    """Seconds of ``new_tokens`` greedy decode steps with the KV cache (the prompt forward excluded)."""
    device = next(model.parameters()).device
    ids = _tokens(model.config.vocab_size, 1, prompt_tokens, seed).to(device)
    name = cache_argument(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: past})
        past, token = out[name], out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def compare_speed(models: dict[str, torch.nn.Module], runs: int = 3, prefill_tokens: int = 512,
                  prompt_tokens: int = 128, new_tokens: int = 64) -> dict[str, SpeedFigures]:
    """Median prefill and decode throughput of each model, runs interleaved across models (one warm-up each)."""
    for model in models.values():
        time_prefill(model, tokens=32)
        time_decode(model, prompt_tokens=8, new_tokens=2)
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for run in range(runs):
        for name, model in models.items():
            prefill[name].append(time_prefill(model, prefill_tokens, seed=run))
            decode[name].append(time_decode(model, prompt_tokens, new_tokens, seed=run))
            log.info("%s run %d: prefill %.3f s, decode %.3f s", name, run, prefill[name][-1], decode[name][-1])
    return {name: SpeedFigures(prefill_tokens / statistics.median(prefill[name]),
                               new_tokens / statistics.median(decode[name]), prefill[name], decode[name])
            for name in models}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def memory_figures(model: torch.nn.Module, targets: list[str] | None = None) -> MemoryFigures:
    """Resident bytes of the model's weights and of its targeted layers (default: the compressed ones)."""
    modules = dict(model.named_modules())
    total = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    names = targets if targets is not None else [n for n, m in modules.items() if isinstance(m, COMPRESSED_TYPES)]
    held = dense = 0
    for name in names:
        module = modules[name]
        tensors = list(module.parameters()) + list(module.buffers())
        held += _tensor_bytes(tensors)
        element = tensors[0].element_size()
        dense += (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)) * element
    return MemoryFigures(total, held, dense)


def to_json(figures) -> dict:
    return asdict(figures)
