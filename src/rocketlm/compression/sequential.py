"""The compression stage with refits: sequential calibration, upstream correction, alternating refinement.

The allocation (which candidate ``(k, s)`` per layer) comes from the dense profiles; this stage only
decides which statistics and which target each chosen layer is factored with:

* ``sequential``: each group of layers is factored with the Gram of its input in the model compressed
  so far (:mod:`rocketlm.calibration.sequential`), not the dense model's Gram;
* ``upstream_correction`` (needs ``sequential``): the target is the dense model's output ``X_d W`` rather
  than ``X_c W`` (:func:`rocketlm.factorization.refit.upstream_corrected_weight`);
* ``sequential_damping``: the sequential Gram (and cross-Gram) damped towards the original weight
  (:func:`rocketlm.factorization.refit.damped_grams`);
* ``refine_iters``: alternating closed-form refits of ``U`` and of ``V``'s kept values
  (:func:`rocketlm.factorization.refit.alternating_refit`).

Every layer's errors are recorded: the profiled ones (dense Gram, as allocated) and the shipped ones
under the Gram it was factored with; the weight error is always against the original dense ``W``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.plan import Allocation, LayerChoice
from rocketlm.calibration.sequential import iterate_sequential_grams
from rocketlm.calibration.store import GramStore
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import SEQUENTIAL_AUTO_DAMPING, SEQUENTIAL_AUTO_FROM_REMOVED, RocketConfig
from rocketlm.compression.apply import refine
from rocketlm.factorization.refit import damped_grams, upstream_corrected_weight, whitened_errors
from rocketlm.factorization.sparse_dictionary import factorize_candidate, layer_basis, whitening_factor
from rocketlm.factorization.whitening import weight_matrix
from rocketlm.models.discovery import DecoderStructure
from rocketlm.monitor import release_free_heap
from rocketlm.preflight import check_processes

log = logging.getLogger(__name__)


def decide_sequential(config: RocketConfig, world_size: int = 1, offloaded: bool = False) -> RocketConfig:
    """``config`` with ``sequential``, ``upstream_correction`` and ``sequential_damping`` decided where they are
    ``None`` (auto): sequential (with correction and damping :data:`SEQUENTIAL_AUTO_DAMPING`) from
    :data:`SEQUENTIAL_AUTO_FROM_REMOVED` removed on, where it runs: one process, the weights in memory.

    Explicit values are kept (the config's own checks and :func:`check_processes` refuse the impossible ones);
    an explicit ``upstream_correction`` or damping turns an auto ``sequential`` on, as they need it.
    """
    sequential = config.sequential
    if sequential is None:
        wanted = config.removed_ratio >= SEQUENTIAL_AUTO_FROM_REMOVED - 1e-9
        possible = world_size == 1 and not offloaded
        sequential = bool(config.upstream_correction or config.sequential_damping) or (wanted and possible)
        if wanted and not possible:
            log.warning("sequential calibration (on by default from %.0f%% removed) is off: it runs in one process "
                        "with the weights in memory (%s); pass --no-sequential to silence this",
                        100 * SEQUENTIAL_AUTO_FROM_REMOVED, "offloaded run" if offloaded else f"{world_size} processes")
        elif sequential:
            log.info("sequential calibration on (default from %.0f%% removed; --no-sequential turns it off)",
                     100 * SEQUENTIAL_AUTO_FROM_REMOVED)
    correction = sequential if config.upstream_correction is None else config.upstream_correction
    damping = config.sequential_damping
    if damping is None:
        damping = SEQUENTIAL_AUTO_DAMPING if sequential else 0.0
    return config.replace(sequential=sequential, upstream_correction=correction, sequential_damping=damping)


def uses_refit_stage(config: RocketConfig) -> bool:
    """Whether the compression stage must run here instead of :func:`apply_allocation` (which refines too:
    ``refine_iters`` alone runs there, layer-parallel and offloaded like the closed form)."""
    return bool(config.sequential or config.upstream_correction)


@dataclass
class LayerRefit:
    name: str
    planned_error_weight: float
    planned_error_output: float
    closed_form_error_output: float  # the closed form under the Gram (and target) it was factored with
    error_output: float  # shipped, same Gram and target
    error_weight: float  # shipped, against the original dense W


@dataclass
class RefitFactors:
    """One layer's factors: ``U`` d_in x k, ``V`` k x d_out (zero outside ``mask``), the target ``W`` they
    approximate (the corrected one with upstream correction), and the whitened error of the closed form."""

    U: torch.Tensor
    V: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    closed_form_error_output: float


def refit_factors(W: torch.Tensor, S: torch.Tensor, cross: torch.Tensor | None, k: int, s: int,
                  config: RocketConfig) -> RefitFactors:
    """Factors of one layer for the candidate ``(k, s)``. ``W``: d_in x d_out (float64); ``S``: upper
    whitening factor of the Gram used; ``cross``: ``X_c^T X_d`` for the upstream-corrected target, or None."""
    target = upstream_corrected_weight(W, S, cross) if cross is not None else W
    basis = layer_basis(target, S, importance_power=config.importance_power,
                        dtype=getattr(torch, config.profile_dtype))
    fact = factorize_candidate(basis, k, s, ridge_rel=config.ridge_rel, with_factors=True)
    del basis  # not needed by the refits
    U, V, _ = refine(target, S, fact, k, s, config.refine_iters)
    return RefitFactors(U, V, fact.mask, target, fact.error_output)


class _PassLinear(torch.nn.Module):
    """A compressed layer while the sequential pass still runs through it: the arithmetic of
    :class:`SparseDictionaryLinear` (``(x U) V + b``) with ``V`` unpacked once instead of every call."""

    def __init__(self, final: SparseDictionaryLinear):
        super().__init__()
        self.final = final
        self.V = final.dense_V()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.final.U) @ self.V
        return y + self.final.bias if self.final.bias is not None else y


def _compress_layer(modules: dict, name: str, choice: LayerChoice, S: torch.Tensor, cross: torch.Tensor | None,
                    config: RocketConfig, value_dtype: torch.dtype) -> tuple[SparseDictionaryLinear, LayerRefit]:
    linear = modules.pop(name)  # the dense layer is freed once the compressed one replaces it in the model
    W = weight_matrix(linear)
    factors = refit_factors(W, S, cross, choice.k, choice.s, config)
    module = SparseDictionaryLinear.from_factors(factors.U, factors.V, factors.mask, choice.s, linear.bias,
                                                 value_dtype).to(linear.weight.device)
    W_hat = module.U.double() @ module.dense_V().double()
    e_w, e_o = whitened_errors(factors.target, S, W_hat, W_ref=W)
    return module, LayerRefit(name, choice.error_weight, choice.error_output, factors.closed_form_error_output,
                              e_o, e_w)


def compress_with_refits(model, structure: DecoderStructure, allocation: Allocation, grams_store: GramStore,
                         windows: torch.Tensor, config: RocketConfig, value_dtype: torch.dtype,
                         progress: bool = True, dist=None) -> dict:
    """Factor and swap in every allocated layer as ``config`` asks (see the module docstring); returns a
    summary of planned vs shipped errors for the checkpoint's checks. One process only (``dist``)."""
    check_processes(config, dist.world_size if dist is not None else 1)
    config = decide_sequential(config)  # a config straight from the API may still say auto
    modules = dict(model.named_modules())
    by_name = {c.name: c for c in allocation.choices if not c.dense}
    records: list[LayerRefit] = []
    finals: dict[str, SparseDictionaryLinear] = {}
    in_pass: dict[int, list[str]] = {}  # block -> its layers that run as a _PassLinear (a dense V each)

    def finish_blocks(before: int) -> None:
        """Swap the final modules into the blocks the pass has left (never run again): their dense Vs go."""
        left = [b for b in in_pass if b < before]
        for b in left:
            for name in in_pass.pop(b):
                replace_module(model, name, finals[name])
        if left:
            release_free_heap()

    n_blocks = 1 + max((b for b, names in enumerate(structure.targets) if by_name.keys() & set(names)), default=-1)
    try:
        with tqdm(total=n_blocks, desc="sequential compression (blocks)", disable=not progress) as bar:
            for stage in iterate_sequential_grams(model, structure, windows[: config.sequential_windows],
                                                  config.calib_batch_size, by_name,
                                                  cross=config.upstream_correction, progress=bar):
                finish_blocks(stage.block)
                gram, cross = damped_grams(stage.gram, stage.cross, config.sequential_damping)
                S = whitening_factor(gram, config.whitening_eps)
                for name in stage.layers:
                    finals[name], record = _compress_layer(modules, name, by_name[name], S, cross, config,
                                                           value_dtype)
                    replace_module(model, name, _PassLinear(finals[name]))
                    in_pass.setdefault(stage.block, []).append(name)
                    records.append(record)
    finally:  # the model never keeps a pass-time module
        finish_blocks(n_blocks)
    return summarize(records, config)


def summarize(records: list[LayerRefit], config: RocketConfig) -> dict:
    def mean(field: str) -> float:
        return sum(getattr(r, field) for r in records) / len(records) if records else 0.0

    summary = {"sequential": config.sequential, "upstream_correction": config.upstream_correction,
               "sequential_damping": config.sequential_damping, "refine_iters": config.refine_iters,
               "layers": len(records)}
    for field in ("planned_error_weight", "planned_error_output", "closed_form_error_output", "error_output",
                  "error_weight"):
        summary[f"mean_{field}"] = mean(field)
    summary["per_layer"] = [asdict(r) for r in records]
    log.info("refit stage: %d layers, mean output error planned %.4f, closed form %.4f, shipped %.4f",
             len(records), summary["mean_planned_error_output"], summary["mean_closed_form_error_output"],
             summary["mean_error_output"])
    return {"refit": summary}
