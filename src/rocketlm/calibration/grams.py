"""Block-by-block forward over calibration windows, accumulating float64 input Grams.

Each batch's ``X^T X`` is one float32 GEMM (float64 when the model runs in float64), added into a
float64 accumulator, as the GPTQ family does: the rounding of one batch's sum (a few thousand tokens)
stays near float32's 6e-8 relative, and the sum over batches is exact to float64.

Only one block's activations are alive at a time: the hidden states entering block ``b``
for every batch are kept (on the calibration device), block ``b`` runs on them with
forward pre-hooks on its target linears, and its outputs become block ``b + 1``'s inputs.
Layers that read the same tensor (q/k/v; gate/up) share one Gram.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from rocketlm.models.discovery import DecoderStructure
from rocketlm.errors import CalibrationError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)




class _StopForward(Exception):
    pass


@dataclass
class BlockGrams:
    """Grams of one block: ``grams[group]`` (d_in x d_in float64) and ``group_of[layer]``."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def gram(self, layer: str) -> torch.Tensor:
        return self.grams[self.group_of[layer]]


class GramAccumulator:
    """Forward pre-hooks on a block's target linears; owns and removes its hooks.

    Within one forward, modules whose input is the very same tensor share a group; the
    tensors seen are held until :meth:`end_batch`, so their ids cannot be reused.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.result = BlockGrams()
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None:
                group = seen[1]
            else:
                group = self.result.group_of.get(name, name)
                self._accumulate(name, group, x)
                self._seen[id(x)] = (x, group)
            if self.result.group_of.setdefault(name, group) != group:
                raise CalibrationError(f"{name}: its input changed grouping between batches")
        return pre_hook

    def _accumulate(self, name: str, group: str, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1])
        X = X.to(gram_work_dtype(X.dtype))
        if group not in self.result.grams:
            self.result.grams[group] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
        if not add_gram_(self.result.grams[group], X):
            raise CalibrationError(f"non-finite (NaN/Inf) activation at the input of {name}; "
                                   "the model overflows in this dtype: try --dtype float32")

    def end_batch(self, tokens: int) -> None:
        self._seen.clear()
        self.result.tokens += tokens

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def first_block_inputs(model: nn.Module, structure: DecoderStructure, batches: list[torch.Tensor]):
    """Hidden states entering the first block for every batch; when the batches differ only in their size, as views
    of one buffer that each is copied into as it is made (as :func:`held_in_one_buffer` holds them, without the
    list of per-batch tensors and the buffer living at once: at 256 x 1024 tokens of width 576 that was 0.6 GB)."""
    first = structure.blocks[0][1]
    captured: list[torch.Tensor] = []
    one_buffer = len({ids.shape[1:] for ids in batches}) == 1
    buffer, rows = None, 0

    def stop(module, args, kwargs):
        nonlocal buffer, rows
        x = args[0] if args else kwargs["hidden_states"]
        if one_buffer:
            if buffer is None:
                buffer = x.new_empty((sum(ids.shape[0] for ids in batches), *x.shape[1:]))
            captured.append(buffer[rows: rows + x.shape[0]])
            captured[-1].copy_(x)
            rows += x.shape[0]
        else:
            captured.append(x)
        raise _StopForward

    handle = first.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)  # before an offload's onload
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def block_kwargs(model: nn.Module, structure: DecoderStructure, ids: torch.Tensor) -> list[dict]:
    """Keyword arguments every block is called with, for inputs of this shape (one forward, stopped as the
    last block is entered: the head never runs, so no ``tokens x vocabulary`` logits are made and an
    offloaded model's head is never read)."""
    per_block: list[dict] = [dict() for _ in structure.blocks]
    handles = []
    last = len(structure.blocks) - 1
    for index, (_, block) in enumerate(structure.blocks):
        def grab(module, args, kwargs, index=index):
            per_block[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == last:
                raise _StopForward
        # prepended: it stops the forward before other pre-hooks run (an offloaded model's onload of the last block)
        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True, prepend=True))
    try:
        model(input_ids=torch.zeros_like(ids), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return per_block


def held_in_one_buffer(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every batch's hidden states as views of one buffer (returned as they are when their shapes differ beyond the
    batch size). States that live through a whole pass over a block (the calibration's, the sensitivities' inputs of
    every block) held as one buffer (large: mmapped) instead of a tensor per batch (a few MB each, in the C heap
    between the blocks' temporaries) do not keep the freed temporaries' pages resident: the fisher sensitivities
    (SmolLM2-135M, 16 x 1024 tokens) peaked at 2.45 GiB instead of 3.42, a 64 x 1024 calibration at 1.40 GiB instead
    of 1.55, with identical results."""
    if not hidden or any(h.shape[1:] != hidden[0].shape[1:] or h.dtype != hidden[0].dtype for h in hidden):
        return hidden
    return list(torch.cat(hidden).split([h.shape[0] for h in hidden]))


def copy_held(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of hidden states, held as :func:`held_in_one_buffer` holds them (one new buffer, no per-batch
    temporaries, where their shapes allow)."""
    copied = held_in_one_buffer(hidden)
    return copied if copied is not hidden else [h.clone() for h in hidden]


def write_back(hidden: list[torch.Tensor], i: int, output: torch.Tensor) -> None:
    """Batch ``i``'s block output in place of its input (a view of the one buffer :func:`first_block_inputs` or
    :func:`held_in_one_buffer` made), once the block has run on it."""
    if output.shape == hidden[i].shape and output.dtype == hidden[i].dtype:
        hidden[i].copy_(output)
    else:
        hidden[i] = output


@torch.no_grad()
def iterate_block_grams(model: nn.Module, structure: DecoderStructure, windows: torch.Tensor,
                        batch_size: int, skip_blocks: set[int] = frozenset(),
                        progress=None) -> Iterator[tuple[int, BlockGrams | None]]:
    """Yield ``(block_index, grams)`` block by block; ``grams`` is None for blocks in ``skip_blocks``
    (their forward still runs to produce the next block's inputs). Stops after the last needed block."""
    device = next(model.parameters()).device
    batches = [windows[i: i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
    kwargs_by_shape = {}
    for ids in batches:
        if ids.shape not in kwargs_by_shape:
            kwargs_by_shape[ids.shape] = block_kwargs(model, structure, ids)
    hidden = first_block_inputs(model, structure, batches)
    modules = dict(model.named_modules())
    last_needed = max((b for b in range(len(structure.blocks)) if b not in skip_blocks), default=-1)
    for b, (_, block) in enumerate(structure.blocks[: last_needed + 1]):
        targets = {name: modules[name] for name in structure.targets[b]}
        accumulator = GramAccumulator(targets) if (b not in skip_blocks and targets) else None
        try:
            for i, ids in enumerate(batches):
                write_back(hidden, i, block_output(block(hidden[i], **kwargs_by_shape[ids.shape][b])))
                if accumulator is not None:
                    accumulator.end_batch(ids.numel())
        finally:
            if accumulator is not None:
                accumulator.remove()
        if progress is not None:
            progress.update(1)
        yield b, (accumulator.result if accumulator is not None else None)


def gram_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype one batch's Gram GEMM runs in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_gram_(G: torch.Tensor, X: torch.Tensor, block: int = 384) -> bool:
    """``G += X^T X`` computing only the block upper triangle (the lower one is its transpose); returns False,
    leaving ``G`` unchanged, when the product's diagonal is not finite.

    The products run in ``X``'s dtype and are added into ``G`` in ``G``'s dtype (float32 GEMMs into a
    float64 accumulator for calibration).

    With ``n = round(d / block)`` column blocks this is ``(n + 1) / (2 n)`` of the GEMM work (62.5% for
    SmolLM2's 1536-wide down_proj input); the result is exactly symmetric.

    The diagonal, ``sum_t x_ti^2``, is NaN or infinite exactly when a column of ``X`` holds a NaN or an
    infinity or its squares overflow ``X``'s dtype: checking it costs ``d`` reads, where checking ``X`` itself
    took a pass over every activation, 30-40% of the update's GEMM time at SmolLM2's widths
    (``bench/bench_cost_gram_update.py``).
    """
    d = X.shape[1]
    n = max(1, round(d / block))
    edges = [round(i * d / n) for i in range(n + 1)]
    diagonal = []
    for i in range(n):
        Xi = X[:, edges[i]: edges[i + 1]]
        part = Xi.T @ Xi
        if not bool(torch.isfinite(part.diagonal()).all()):
            return False
        diagonal.append(part)
    for i in range(n):
        a, b = edges[i], edges[i + 1]
        G[a:b, a:b] += 0.5 * (diagonal[i] + diagonal[i].T)  # a GEMM's diagonal block is symmetric only to rounding
        Xi = X[:, a:b]
        for j in range(i + 1, n):
            c, e = edges[j], edges[j + 1]
            part = Xi.T @ X[:, c:e]
            G[a:b, c:e] += part
            G[c:e, a:b] += part.T
    return True
