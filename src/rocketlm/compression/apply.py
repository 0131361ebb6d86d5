"""The compression stage: factor every allocated layer with its chosen candidate and swap in the
compressed module."""
from __future__ import annotations

from collections.abc import Collection

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.plan import Allocation, LayerChoice
from rocketlm.calibration.store import GramStore
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import RocketConfig
from rocketlm.errors import ErrorMismatchError
from rocketlm.factorization.refit import alternating_refit
from rocketlm.factorization.sparse_dictionary import Factorization, direct_errors, factorize_candidate, layer_basis
from rocketlm.factorization.whitening import weight_matrix, whitened_layers
from rocketlm.models.discovery import DecoderStructure
from rocketlm.monitor import release_free_heap


def apply_allocation(model, structure: DecoderStructure, allocation: Allocation, grams_store: GramStore,
                     config: RocketConfig, value_dtype: torch.dtype, progress: bool = True, dist=None,
                     only: Collection[str] | None = None, desc: str = "compression (layers)") -> dict:
    """Factor every non-dense layer (or those in ``only``) with its chosen candidate and swap in the
    compressed module.

    The factorization is the profiled one (same function, same dtype); its errors must agree
    with the profiled errors, and the errors recomputed from the shipped ``U V`` in float64
    must agree too (within float32 rounding of the profiling algebra). With ``config.refine_iters``
    the closed form is then refined (:func:`rocketlm.factorization.refit.alternating_refit`: the
    mask fixed, least-squares refits of ``U`` and, by conjugate gradients, of the kept values), and the shipped output
    error must be no larger than the profiled one. Returns the worst gaps.
    ``dist``: a :class:`rocketlm.distributed.DistContext`; with several processes the layers are
    shared out and rank 0's model receives them all (``rocketlm.distributed.compression``).
    """
    if dist is not None and dist.distributed:
        from rocketlm.distributed.compression import apply_parallel
        return apply_parallel(model, structure, allocation, grams_store, config, value_dtype, progress, dist)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    by_name = {c.name: c for c in allocation.choices if not c.dense and (only is None or c.name in only)}
    worst = {"profile_vs_shipped": 0.0, "profile_vs_direct": 0.0}
    with tqdm(total=len(by_name), desc=desc, disable=not progress) as bar:
        for name, S, _ in whitened_layers(structure, grams_store, by_name.__contains__, config.whitening_eps, device):
            choice, linear = by_name[name], modules.pop(name)  # freed once replaced
            W = weight_matrix(linear)
            basis = layer_basis(W, S, importance_power=config.importance_power, dtype=dtype)
            fact = factorize_candidate(basis, choice.k, choice.s, ridge_rel=config.ridge_rel, with_factors=True)
            del basis  # not needed by the refits: their peak is 0.22 GB lower on a 2048 x 8192 layer (k = 1434)
            U, V, refined = refine(W, S, fact, choice.k, choice.s, config.refine_iters)
            module = SparseDictionaryLinear.from_factors(U, V, fact.mask, choice.s, linear.bias, value_dtype)
            e_w, e_o = direct_errors(W, S, module.U.double() @ module.dense_V().double())
            check_agreement(name, worst, choice, fact, e_w, e_o, refined)
            replace_module(model, name, module.to(device))
            del W, S, fact, U, V, module, linear
            release_free_heap()
            bar.update(1)
    return worst


def refine(W: torch.Tensor, S: torch.Tensor, fact: Factorization, k: int, s: int, iterations: int
           ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(U, V, refined)``: the closed form's factors, refined by ``iterations`` alternating refits where
    the candidate is sparse (without sparsity the closed form is the truncated SVD: already optimal)."""
    if not iterations or s >= k:
        return fact.U, fact.V, False
    result = alternating_refit(W, S, fact.U, fact.V, fact.mask, iterations)
    return result.U, result.V, True


def check_agreement(name: str, worst: dict, choice: LayerChoice, fact: Factorization, e_w: float, e_o: float,
                    refined: bool = False) -> None:
    """Raise :class:`ErrorMismatchError` when the shipped factors do not reproduce the profiled errors
    (a refined layer: when its output error is larger than the profiled one; its weight error may move)."""
    shipped = max(abs(fact.error_weight - choice.error_weight), abs(fact.error_output - choice.error_output))
    if refined:
        direct = max(0.0, e_o - choice.error_output)
        e_w = choice.error_weight  # the refit minimises the output error only
    else:
        direct = max(abs(e_w - choice.error_weight), abs(e_o - choice.error_output))
    worst["profile_vs_shipped"] = max(worst["profile_vs_shipped"], shipped)
    worst["profile_vs_direct"] = max(worst["profile_vs_direct"], direct)
    if shipped > 1e-4 + 1e-3 * choice.error_weight or direct > 5e-3 + 2e-2 * max(e_w, e_o):
        raise ErrorMismatchError(
            f"{name}: profiled errors (weight {choice.error_weight:.5f}, output {choice.error_output:.5f}) differ from "
            f"the shipped factors' (recomputed {fact.error_weight:.5f}/{fact.error_output:.5f}, "
            f"direct {e_w:.5f}/{e_o:.5f}); the profile cache may be stale: delete it and rerun")
