"""The weights of an offloaded (compressed) model, written one tensor at a time."""
from __future__ import annotations

from pathlib import Path

import torch

from rocketlm.offload.model import OffloadedModel
from rocketlm.offload.safetensors_stream import StreamingSafetensorsWriter


def unique_state_names(model: torch.nn.Module) -> list[str]:
    """State names as ``save_pretrained`` keeps them: tied tensors once, under their first name
    (identity of the parameter object, which also holds on the meta device)."""
    seen, names = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor) if tensor.device.type == "meta" else (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def write_offloaded(model: torch.nn.Module, directory: str | Path) -> None:
    """``config.json`` (with whatever ``quantization_config`` the caller set), ``generation_config.json``
    and ``model.safetensors``, the block tensors streamed from their piece files."""
    off: OffloadedModel = model.rocketlm_offload
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    state = model.state_dict(keep_vars=True)
    names = unique_state_names(model)
    specs = {name: (tuple(state[name].shape), state[name].dtype) for name in names}
    with StreamingSafetensorsWriter(directory / "model.safetensors", specs, {"format": "pt"}) as writer:
        for name in names:
            held = state[name]
            if name in off.sources and (held.device.type == "meta" or off.block_of(name) is None):
                src = off.sources[name]
                if src.dtype == held.dtype:  # bytes copied file to file in chunks: nothing resident
                    writer.copy_from(name, src.path, src.start, src.end)
                    continue
                value = src.read().to(held.dtype)  # plain read: no mapped page stays resident
            else:
                value = held.detach()
            writer.write(name, value)
            del value
