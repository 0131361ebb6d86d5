"""Per-layer sensitivities of the model's loss to each target layer's output (for the ``fisher`` cost).

Second-order model of the loss (empirical Fisher, isotropic over a layer's output coordinates): an
output perturbation ``dY`` of layer ``l`` raises the summed token NLL by about
``1/2 sum_t (g_t . dy_t)^2 ~ 1/2 (mean_t ||g_t||^2 / d_out) ||dY||^2``, with ``g_t`` the gradient of the
summed NLL with respect to the layer's output at token ``t``. A candidate with relative output error
``e_o = ||dY|| / ||Y||`` therefore costs about ``sensitivity * e_o^2`` nats per token, with

    sensitivity = 1/2 * (mean_t ||g_t||^2 / d_out) * mean_t ||y_t||^2.

One forward and one backward pass over the first ``samples`` calibration windows measures every layer
at once, block by block (so an offloaded model keeps one block resident); the model's weights receive no
gradient and are never changed. The pass is data-parallel under torchrun
(:mod:`rocketlm.distributed.sensitivity`): its sums over disjoint windows add up.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rocketlm.calibration.grams import block_kwargs, first_block_inputs, held_in_one_buffer
from rocketlm.models.discovery import DecoderStructure
from rocketlm.storage import stable_hash, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    grad_sq: float  # mean over tokens of ||g_t||^2
    out_sq: float  # mean over tokens of ||y_t||^2
    d_out: int

    @property
    def sensitivity(self) -> float:
        return 0.5 * self.grad_sq / self.d_out * self.out_sq


class _Recorder:
    """Forward hooks on the target layers summing ``||y_t||^2`` and, through tensor hooks, ``||g_t||^2``."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.grad_sq = {name: 0.0 for name in modules}
        self.out_sq = {name: 0.0 for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def forward_hook(module, args, out):
            self.out_sq[name] += float(out.detach().to(torch.float64).square().sum())
            if out.requires_grad:
                out.register_hook(lambda grad: self._add_grad(name, grad))
        return forward_hook

    def _add_grad(self, name: str, grad: torch.Tensor) -> None:
        self.grad_sq[name] += float(grad.to(torch.float64).square().sum())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Passthrough(torch.nn.Module):
    """Stands in for a decoder block while only the head runs: returns its input, or ``result`` (the last
    block's output), in the block's output type; keeps the attributes the decoder loop reads."""

    def __init__(self, block: torch.nn.Module, result: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.result, self.as_tuple = result, as_tuple
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.result is None else self.result
        return (out,) if self.as_tuple else out


HEAD_LOGIT_BYTES = 64 << 20  # float32 logits the head gradient makes at a time (tokens x vocabulary)


def _head_gradient(model, structure: DecoderStructure, last: torch.Tensor, ids: torch.Tensor, as_tuple: bool,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """Gradient of the summed next-token NLL with respect to the last block's output ``last``:
    the model's forward with every block replaced by a pass-through, so only the embedding, the final norm
    and the head run (no block weight is read). The head is position-wise, so it runs on ``chunk_tokens``
    positions of one window at a time (default: ``HEAD_LOGIT_BYTES`` of logits), never on the whole
    ``tokens x vocabulary`` logits at once."""
    parent_name, _, attr = structure.blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    leaf = last.detach().requires_grad_(True)
    if chunk_tokens is None:
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
        chunk_tokens = max(1, HEAD_LOGIT_BYTES // (4 * vocab))
    stand_ins = [_Passthrough(block, None, as_tuple) for block in blocks]
    rows, length = ids.shape
    setattr(parent, attr, torch.nn.ModuleList(stand_ins))
    try:
        for row in range(rows):
            for start in range(0, length - 1, chunk_tokens):  # the last position has no next token
                end = min(start + chunk_tokens, length - 1)
                stand_ins[-1].result = leaf[row: row + 1, start:end]
                logits = model(input_ids=ids[row: row + 1, start:end], use_cache=False).logits
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[row, start + 1: end + 1],
                                      reduction="sum")
                nll.backward()
                del logits, nll
    finally:
        stand_ins[-1].result = None
        setattr(parent, attr, blocks)
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


class _Inputs:
    """Every block's input for every batch: in memory, or spilled to ``spill_dir`` (one file per block)."""

    def __init__(self, spill_dir: Path | None):
        self.spill_dir, self.held = spill_dir, {}

    def put(self, b: int, hidden: list[torch.Tensor]) -> None:
        if self.spill_dir is None:
            self.held[b] = held_in_one_buffer([h.detach() for h in hidden])  # kept until the backward reaches b
        else:
            torch.save([h.detach().cpu() for h in hidden], self.spill_dir / f"sensitivity-inputs-{b:05d}.pt")

    def take(self, b: int, device: torch.device) -> list[torch.Tensor]:
        if self.spill_dir is None:
            return self.held.pop(b)
        path = self.spill_dir / f"sensitivity-inputs-{b:05d}.pt"
        hidden = [h.to(device) for h in torch.load(path)]
        path.unlink()
        return hidden


@dataclass
class SensitivitySums:
    """Unnormalised sums of one pass over some windows: ``||g_t||^2`` and ``||y_t||^2`` summed over their tokens,
    per layer. Sums from disjoint shares of the windows add up (a multi-process run sums them over the ranks)."""
    grad_sq: dict[str, float]
    out_sq: dict[str, float]
    d_out: dict[str, int]
    tokens: int

    def finish(self) -> dict[str, LayerSensitivity]:
        """Per-token means: the :class:`LayerSensitivity` of every layer."""
        tokens = max(self.tokens, 1)
        return {name: LayerSensitivity(self.grad_sq[name] / tokens, self.out_sq[name] / tokens, self.d_out[name])
                for name in self.grad_sq}


def measure_sensitivities(model, structure: DecoderStructure, windows: torch.Tensor, batch_size: int = 1,
                          progress: bool = True, hold=None, spill_dir: str | Path | None = None,
                          head_chunk_tokens: int | None = None) -> dict[str, LayerSensitivity]:
    """Sensitivity of every target layer over ``windows`` (n x seq_len token ids); weights are left untouched.
    See :func:`measure_sensitivity_sums` for how and at what memory."""
    return measure_sensitivity_sums(model, structure, windows, batch_size, progress, hold, spill_dir,
                                    head_chunk_tokens).finish()


def measure_sensitivity_sums(model, structure: DecoderStructure, windows: torch.Tensor, batch_size: int = 1,
                             progress: bool = True, hold=None, spill_dir: str | Path | None = None,
                             head_chunk_tokens: int | None = None) -> SensitivitySums:
    """The sums behind the sensitivities over ``windows`` (n x seq_len token ids, possibly none).

    Block by block (gradient checkpointing at block boundaries): one forward without gradients keeps every
    block's input; the gradient at the last block's output comes from the head alone; then the blocks, last
    to first, each re-run their forward with gradients and pass the gradient of their input back. Peak
    memory: one block's activations for one batch, plus every block's inputs (in memory, or in
    ``spill_dir``). ``hold(b)``: a context manager that keeps block ``b``'s weights resident while it runs
    (an offloaded model: :meth:`rocketlm.offload.model.OffloadedModel.holding`).
    """
    hold = hold or (lambda b: contextlib.nullcontext())
    modules = dict(model.named_modules())
    totals = {name: [0.0, 0.0] for name in structure.all_targets}  # grad_sq, out_sq
    d_out = {name: int(modules[name].weight.shape[0]) for name in structure.all_targets}
    if windows.shape[0] == 0:  # an empty share (more processes than windows)
        return SensitivitySums({n: 0.0 for n in totals}, {n: 0.0 for n in totals}, d_out, 0)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    batches = [windows[i: i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
    kwargs_by_shape = {}
    for ids in batches:
        if ids.shape not in kwargs_by_shape:
            kwargs_by_shape[ids.shape] = block_kwargs(model, structure, ids)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inputs = _Inputs(Path(spill_dir) if spill_dir is not None else None)
    n = len(structure.blocks)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        hidden = first_block_inputs(model, structure, batches)
        as_tuple = False
        with torch.no_grad(), tqdm(total=2 * n, desc="sensitivity (blocks)", disable=not progress) as bar:
            for b, (_, block) in enumerate(structure.blocks):
                inputs.put(b, hidden)
                with hold(b):
                    outs = [block(h, **kwargs_by_shape[ids.shape][b]) for h, ids in zip(hidden, batches)]
                as_tuple = isinstance(outs[0], (tuple, list))
                hidden = [o[0] if as_tuple else o for o in outs]
                bar.update(1)
            with torch.enable_grad():
                grads = [_head_gradient(model, structure, h, ids, as_tuple, head_chunk_tokens)
                         for h, ids in zip(hidden, batches)]
                del hidden
                for b in reversed(range(n)):
                    grads = _block_backward(structure, modules, b, inputs.take(b, device), grads, batches,
                                            kwargs_by_shape, hold, totals)
                    bar.update(1)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return SensitivitySums({n: g for n, (g, _) in totals.items()}, {n: o for n, (_, o) in totals.items()}, d_out,
                           windows.numel())


def _block_backward(structure: DecoderStructure, modules: dict, b: int, hidden: list[torch.Tensor],
                    grads: list[torch.Tensor], batches: list[torch.Tensor], kwargs_by_shape: dict, hold,
                    totals: dict) -> list[torch.Tensor]:
    """Re-run block ``b`` with gradients on each batch's input, backpropagate the gradient at its output,
    add its target layers' ``||g||^2`` and ``||y||^2`` to ``totals``; returns the gradients at its input."""
    block = structure.blocks[b][1]
    recorder = _Recorder({name: modules[name] for name in structure.targets[b]})
    out_grads = []
    try:
        with hold(b):
            for h, g, ids in zip(hidden, grads, batches):
                leaf = h.detach().requires_grad_(True)
                out = block(leaf, **kwargs_by_shape[ids.shape][b])
                (out[0] if isinstance(out, (tuple, list)) else out).backward(g)
                out_grads.append(leaf.grad)
    finally:
        recorder.remove()
    for name in structure.targets[b]:
        totals[name][0] += recorder.grad_sq[name]
        totals[name][1] += recorder.out_sq[name]
    return out_grads


def sensitivity_cache_path(cache_dir: Path, calibration_key: str, samples: int) -> Path:
    """Where the sensitivities of the first ``samples`` windows are cached (the calibration key covers the
    model weights and the windows)."""
    return Path(cache_dir) / "sensitivity" / f"{stable_hash(calibration_key, samples)}.json"


def read_sensitivity_cache(path: Path) -> dict[str, LayerSensitivity] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {name: LayerSensitivity(**v) for name, v in data["layers"].items()}


def write_sensitivity_cache(path: Path, calibration_key: str, samples: int,
                            result: dict[str, LayerSensitivity]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"calibration": calibration_key, "samples": samples,
                             "layers": {name: asdict(v) for name, v in result.items()}})


def cached_sensitivities(model, structure: DecoderStructure, windows: torch.Tensor, samples: int, cache_dir: Path,
                         calibration_key: str, progress: bool = True, hold=None,
                         spill_dir: Path | None = None) -> dict[str, LayerSensitivity]:
    """:func:`measure_sensitivities` on the first ``samples`` windows, cached under ``cache_dir/sensitivity``
    (keyed by the calibration key and ``samples``)."""
    path = sensitivity_cache_path(cache_dir, calibration_key, samples)
    result = read_sensitivity_cache(path)
    if result is None:
        result = measure_sensitivities(model, structure, windows[:samples], progress=progress, hold=hold,
                                       spill_dir=spill_dir)
        write_sensitivity_cache(path, calibration_key, samples, result)
    return result


def attach_sensitivities(profiles, sensitivities: dict[str, LayerSensitivity]) -> None:
    """Set ``profile.sensitivity`` (read by the ``fisher`` cost) on every profile."""
    for profile in profiles:
        profile.sensitivity = sensitivities[profile.name].sensitivity
