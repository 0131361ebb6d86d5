"""Sequential calibration: the Grams of every layer's input in the model *as compressed so far*.

GPTQ / SparseGPT / SVD-LLM "sequential" mode. Blocks are visited in order, and inside a block its
Gram groups (layers reading one tensor: q/k/v, o, gate/up, down) in execution order. For each group
that has layers to compress, every calibration batch is run through the block up to that group's
input (the forward stops there), whose Gram is accumulated; the caller then compresses the group's
layers before the iterator moves to the next group, so later groups see the compressed ones. After
the last group the block runs whole and its outputs become the next block's inputs. The Gram a layer
is given therefore equals the Gram of its input in the final compressed model.

With ``cross=True`` a dense stream runs beside it: the hidden states of the uncompressed model and,
per group, the cross-Gram ``K = X_c^T X_d`` of compressed and dense inputs of the same tokens (a copy
of the block taken before any of its layers is compressed gives the dense inputs).

Memory stays block-wise: the hidden states entering the current block (one stream, or two with
``cross``), one group's Grams, and with ``cross`` one dense copy of the current block and (up to
``max_stored_bytes``) its groups' dense inputs.
"""
from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rocketlm.calibration.grams import (add_gram_, block_kwargs, block_output, copy_held, first_block_inputs,
                                        gram_work_dtype, write_back)
from rocketlm.errors import CalibrationError
from rocketlm.models.discovery import DecoderStructure


class _StopForward(Exception):
    pass


@dataclass
class StageGrams:
    """The input statistics of one group of layers (they read the same tensor).

    ``gram``: ``X_c^T X_c`` (d_in x d_in, float64) of the compressed model's input; ``cross``:
    ``X_c^T X_d`` with the dense model's input of the same tokens (only with ``cross``). As in the dense
    calibration, each batch's product runs in :func:`gram_work_dtype` and the batches sum in float64;
    ``layers``: the group's layers to compress, full names in execution order.
    """

    block: int
    layers: tuple[str, ...]
    gram: torch.Tensor
    cross: torch.Tensor | None
    tokens: int


def _relative(block_name: str, name: str) -> str:
    return name[len(block_name) + 1:]


@torch.no_grad()
def block_groups(block: nn.Module, block_name: str, names: Collection[str], hidden: torch.Tensor,
                 kwargs: dict) -> list[tuple[str, ...]]:
    """``names`` (target layers of ``block``) grouped by the tensor they read, groups in execution order
    (one forward of ``hidden`` with pre-hooks recording the order of first calls)."""
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}
    groups: list[list[str]] = []
    handles = []
    for name in names:
        def hook(module, args, name=name):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, [])
                groups.append(seen[id(x)][1])
            if name not in seen[id(x)][1]:
                seen[id(x)][1].append(name)
        handles.append(block.get_submodule(_relative(block_name, name)).register_forward_pre_hook(hook))
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = set(names) - {n for g in groups for n in g}
    if missing:
        raise CalibrationError(f"{sorted(missing)}: never called in a forward of {block_name}")
    return [tuple(g) for g in groups]


@torch.no_grad()
def group_input(block: nn.Module, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input ``module`` (inside ``block``) receives when ``block`` runs on ``hidden``; the forward stops there."""
    captured: list[torch.Tensor] = []

    def stop(mod, args):
        captured.append(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(stop)
    try:
        block(hidden, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise CalibrationError(f"{type(module).__name__} was not called in the block's forward")
    return captured[0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Tokens x features in the dtype of the dense calibration's products (:func:`gram_work_dtype`)."""
    X = x.detach().reshape(-1, x.shape[-1])
    return X.to(gram_work_dtype(X.dtype))


def _non_finite(name: str) -> CalibrationError:
    return CalibrationError(f"non-finite (NaN/Inf) activation at the input of {name} in sequential calibration")


class _Streams:
    """Hidden states entering the current block for every batch: compressed stream, and dense with ``cross``.

    With ``cross``, the dense block runs once per batch and keeps every group's dense input for the
    block's stages when they fit in ``max_stored_bytes``; otherwise each stage reruns the dense block
    up to its group's input (the same numbers, more compute).
    """

    def __init__(self, model: nn.Module, structure: DecoderStructure, windows: torch.Tensor, batch_size: int,
                 cross: bool, max_stored_bytes: int):
        device = next(model.parameters()).device
        self.batches = [windows[i: i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
        shapes = {}
        for ids in self.batches:
            if ids.shape not in shapes:
                shapes[ids.shape] = block_kwargs(model, structure, ids)
        self.kwargs = [shapes[ids.shape] for ids in self.batches]
        # each stream's hidden states in one buffer, outputs written back in place (see held_in_one_buffer)
        self.compressed = first_block_inputs(model, structure, self.batches)
        self.dense = copy_held(self.compressed) if cross else None
        self.max_stored_bytes = max_stored_bytes
        self.dense_inputs: dict[str, list[torch.Tensor]] | None = None

    def begin_block(self, b: int, dense_block: nn.Module | None, block_name: str,
                    groups: list[tuple[str, ...]]) -> None:
        """With ``cross`` and enough room: advance the dense stream through block ``b``, keeping the dense
        input of every group's first layer for every batch."""
        self.dense_inputs = None
        if dense_block is None or not groups:
            return
        firsts = {g[0]: dense_block.get_submodule(_relative(block_name, g[0])) for g in groups}
        tokens = sum(h.shape[:-1].numel() for h in self.dense)
        element = self.dense[0].element_size()
        if dense_inputs_bytes(tokens, element, [m.weight.shape[1] for m in firsts.values()]) > self.max_stored_bytes:
            return
        self.dense_inputs = {name: [] for name in firsts}
        entering = None  # the batch's input; a layer reading it itself keeps a copy: write_back overwrites it

        def keep(args, name):
            x = args[0]
            aliased = x.untyped_storage().data_ptr() == entering.untyped_storage().data_ptr()
            self.dense_inputs[name].append(x.clone() if aliased else x)

        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: keep(args, name))
                   for name, m in firsts.items()]
        try:
            for i in range(len(self.batches)):
                entering = self.dense[i]
                write_back(self.dense, i, block_output(dense_block(self.dense[i], **self.kwargs[i][b])))
        finally:
            for handle in handles:
                handle.remove()

    def _dense_input(self, i: int, b: int, dense_block: nn.Module, block_name: str, first: str) -> torch.Tensor:
        if self.dense_inputs is not None:
            return self.dense_inputs[first][i]
        module = dense_block.get_submodule(_relative(block_name, first))
        return group_input(dense_block, module, self.dense[i], self.kwargs[i][b])

    def stage(self, b: int, block: nn.Module, dense_block: nn.Module | None, block_name: str,
              layers: tuple[str, ...]) -> StageGrams:
        """Accumulate one group's Gram (and cross-Gram) over every batch."""
        first = layers[0]
        module = block.get_submodule(_relative(block_name, first))
        gram, cross, tokens = None, None, 0
        for i in range(len(self.batches)):
            X_c = _flat(group_input(block, module, self.compressed[i], self.kwargs[i][b]))
            if gram is None:
                gram = torch.zeros(X_c.shape[1], X_c.shape[1], dtype=torch.float64, device=X_c.device)
            if not add_gram_(gram, X_c):  # checks X_c through its Gram's diagonal
                raise _non_finite(first)
            if dense_block is not None:
                X_d = _flat(self._dense_input(i, b, dense_block, block_name, first))
                if cross is None:
                    cross = torch.zeros(X_c.shape[1], X_d.shape[1], dtype=torch.float64, device=X_c.device)
                part = X_c.T @ X_d  # one product per batch in the work dtype, summed in float64
                # X_c is finite here, so a NaN/Inf of X_d (or an overflow) makes its column of the product non-finite
                if not bool(torch.isfinite(part).all()):
                    raise _non_finite(first)
                cross += part
            tokens += self.batches[i].numel()
        if self.dense_inputs is not None:
            del self.dense_inputs[first]  # each group is staged once
        return StageGrams(b, layers, gram, cross, tokens)

    @torch.no_grad()
    def advance(self, b: int, block: nn.Module, dense_block: nn.Module | None) -> None:
        dense_done = self.dense_inputs is not None
        for i in range(len(self.batches)):
            write_back(self.compressed, i, block_output(block(self.compressed[i], **self.kwargs[i][b])))
            if dense_block is not None and not dense_done:
                write_back(self.dense, i, block_output(dense_block(self.dense[i], **self.kwargs[i][b])))
        self.dense_inputs = None


# Room for one block's dense inputs (with ``cross``): beyond it, each group reruns the dense block (see _Streams).
DENSE_INPUTS_BYTES = 2 << 30


def dense_inputs_bytes(tokens: int, element_bytes: int, group_widths: Collection[int]) -> int:
    """Bytes of one block's dense inputs kept for its groups (``tokens`` calibration tokens, the ``d_in`` of every
    Gram group of the block), as :class:`_Streams` counts them against ``max_stored_bytes``."""
    return tokens * element_bytes * sum(group_widths)


@torch.no_grad()
def iterate_sequential_grams(model: nn.Module, structure: DecoderStructure, windows: torch.Tensor, batch_size: int,
                             wanted: Collection[str], cross: bool = False, progress=None,
                             max_stored_bytes: int = DENSE_INPUTS_BYTES) -> Iterator[StageGrams]:
    """Yield one :class:`StageGrams` per group holding layers in ``wanted``, in execution order.

    The caller may replace the yielded layers (``replace_module``) before asking for the next item:
    every later group, in this block and after it, is calibrated on the model as it is then. Blocks after
    the last one with a wanted layer are not run. ``max_stored_bytes``: room for one block's dense inputs
    (with ``cross``), see :class:`_Streams`.
    """
    wanted = set(wanted)
    streams = _Streams(model, structure, windows, batch_size, cross, max_stored_bytes)
    last = max((b for b, names in enumerate(structure.targets) if wanted.intersection(names)), default=-1)
    for b, (block_name, block) in enumerate(structure.blocks[: last + 1]):
        names = [n for n in structure.targets[b] if n in wanted]
        dense_block = copy.deepcopy(block) if cross else None
        if names:
            groups = block_groups(block, block_name, names, streams.compressed[0], streams.kwargs[0][b])
            streams.begin_block(b, dense_block, block_name, groups)
            for layers in groups:
                yield streams.stage(b, block, dense_block, block_name, layers)
        streams.advance(b, block, dense_block)
        del dense_block
        if progress is not None:
            progress.update(1)
