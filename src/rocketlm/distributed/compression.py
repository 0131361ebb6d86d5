"""Layer-parallel compression: each rank factors its share of the allocated layers (packed by
estimated cost), checks them as a single process does, and sends the compressed modules'
tensors to rank 0, which swaps every one of them into its model (the one it saves)."""
from __future__ import annotations

import logging

import torch

from rocketlm.allocation.plan import Allocation
from rocketlm.calibration.store import GramStore
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import RocketConfig
from rocketlm.distributed.assign import balance, factor_cost
from rocketlm.distributed.context import DistContext
from rocketlm.distributed.profiling import layer_shapes
from rocketlm.models.discovery import DecoderStructure

log = logging.getLogger(__name__)


def module_state(module: SparseDictionaryLinear) -> dict:
    """What rebuilds ``module`` elsewhere: its shape and its tensors, on the CPU."""
    return {"shape": (module.in_features, module.out_features, module.k, module.s), "bias": module.bias is not None,
            "dtype": module.U.dtype, "tensors": {k: v.detach().cpu() for k, v in module.state_dict().items()}}


def rebuild_module(state: dict, device: torch.device) -> SparseDictionaryLinear:
    module = SparseDictionaryLinear(*state["shape"], bias=state["bias"], dtype=state["dtype"], device="cpu")
    module.load_state_dict(state["tensors"])
    return module.to(device)


def assign_compression(model, allocation: Allocation, dist: DistContext) -> list[str]:
    """This rank's share of the layers to compress, packed by estimated factoring cost."""
    chosen = {c.name: c for c in allocation.choices if not c.dense}
    shapes = layer_shapes(model, chosen)
    costs = {name: factor_cost(*shapes[name], c.k, c.s) for name, c in chosen.items()}
    share = balance(costs, dist.world_size)[dist.rank]
    log.info("compression: %s factors %d of the %d compressed layers", dist.tag, len(share), len(chosen))
    return share


def _merge_checks(parts: list[dict]) -> dict:
    return {key: max(part[key] for part in parts) for key in parts[0]}


def apply_parallel(model, structure: DecoderStructure, allocation: Allocation, grams_store: GramStore,
                   config: RocketConfig, value_dtype: torch.dtype, progress: bool, dist: DistContext) -> dict:
    """Compress the allocated layers over the ranks; rank 0's model ends fully compressed (the other
    ranks' models hold only their own share). Returns the worst agreement gaps over every rank."""
    from rocketlm.compression.apply import apply_allocation

    share = assign_compression(model, allocation, dist)
    with dist.step("compressing"):
        worst = apply_allocation(model, structure, allocation, grams_store, config, value_dtype, progress,
                                 only=share, desc=f"compression (layers), {dist.tag}")
        states = {name: module_state(model.get_submodule(name)) for name in share}
    gathered = dist.gather_to_main((worst, states))
    with dist.step("assembling the compressed model"):
        if dist.is_main:
            device = next(model.parameters()).device
            for _, part in gathered[1:]:
                for name, state in part.items():
                    replace_module(model, name, rebuild_module(state, device))
            worst = _merge_checks([w for w, _ in gathered])
    return worst
