"""The compressed layers of a model as the ``quantization_config`` of its checkpoint sees them.

``layers`` maps a module name to its shape ``{d_in, d_out, k, s, bias}``; that is all a loader needs
to put an empty :class:`~rocketlm.compression.modules.SparseDictionaryLinear` in place of the
model's ``nn.Linear`` so that the stored tensors (``U``, ``V_values``, ``V_mask``, ``bias``) load by
name. Nothing here imports transformers.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.errors import CheckpointError
from rocketlm.runtime.forms import FactoredLinear, PackedLinear, SparseFactoredLinear

log = logging.getLogger(__name__)

QUANT_METHOD = "rocket"
FORMAT_VERSION = 2  # of the checkpoint: quantization_config in config.json, loadable with from_pretrained
LAYER_KEYS = ("d_in", "d_out", "k", "s", "bias")
COMPRESSED_TYPES = (SparseDictionaryLinear, FactoredLinear, SparseFactoredLinear, PackedLinear)


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every compressed layer of ``model``, canonical or in a factored run-time form (``merged`` ones are
    plain ``nn.Linear`` and not listed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSED_TYPES)}


def layer_spec(module: nn.Module) -> dict:
    return {"d_in": module.in_features, "d_out": module.out_features, "k": module.k, "s": module.s,
            "bias": module.bias is not None}


def check_spec(name: str, spec) -> dict:
    """A layer entry of a ``quantization_config``, validated; :class:`CheckpointError` when malformed."""
    if not isinstance(spec, dict) or set(spec) != set(LAYER_KEYS):
        raise CheckpointError(f"quantization_config layer {name!r} must have exactly {', '.join(LAYER_KEYS)}, got "
                              f"{spec!r}; the checkpoint's config.json is damaged: write it again with rocketlm")
    dims = [spec[key] for key in LAYER_KEYS[:4]]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims) or spec["s"] > spec["k"] \
            or not isinstance(spec["bias"], bool):
        raise CheckpointError(f"quantization_config layer {name!r} has invalid shape {spec!r} (positive integers, "
                              "s <= k, bias true/false); the checkpoint's config.json is damaged")
    return {key: spec[key] for key in LAYER_KEYS}


def quantization_config_dict(layers: dict[str, dict], runtime: str = "auto") -> dict:
    """The ``quantization_config`` entry of ``config.json`` for these layers."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "runtime": runtime,
            "layers": {name: check_spec(name, spec) for name, spec in layers.items()}}


def model_quantization_config(model: nn.Module, runtime: str = "auto") -> dict:
    return quantization_config_dict({name: layer_spec(m) for name, m in compressed_layers(model).items()}, runtime)


def specs_from_allocation(allocation, tensor_names) -> dict[str, dict]:
    """Layer shapes of a format-1 checkpoint: its allocation, the bias from the stored tensor names."""
    names = set(tensor_names)
    layers = {}
    for c in allocation.choices:
        if c.dense:
            continue
        missing = [f"{c.name}.{t}" for t in ("U", "V_values", "V_mask") if f"{c.name}.{t}" not in names]
        if missing:
            raise CheckpointError(f"tensors {missing} of compressed layer {c.name} are missing from the weights: "
                                  "corrupt checkpoint, re-run compress")
        layers[c.name] = {"d_in": c.d_in, "d_out": c.d_out, "k": c.k, "s": c.s, "bias": f"{c.name}.bias" in names}
    return layers


def empty_compressed_linear(model: nn.Module, name: str, spec: dict) -> SparseDictionaryLinear:
    """Replace the ``nn.Linear`` at ``name`` by an empty canonical module of shape ``spec`` (same dtype, device)."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (spec["d_in"], spec["d_out"]):
        found = "nothing" if linear is None else f"{type(linear).__name__}{_linear_shape(linear)}"
        raise CheckpointError(f"quantization_config lists compressed layer {name} ({spec['d_in']} -> {spec['d_out']}) "
                              f"but the model built from config.json has {found} there; the checkpoint's config.json "
                              "does not belong to its weights: write it again with rocketlm")
    module = SparseDictionaryLinear(spec["d_in"], spec["d_out"], spec["k"], spec["s"], bias=spec["bias"],
                                    dtype=linear.weight.dtype, device=linear.weight.device)
    replace_module(model, name, module)
    return module


def _linear_shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f" ({module.in_features} -> {module.out_features})"
    return ""


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``W_hat`` (out x in, ``nn.Linear`` layout) of a canonical or factored compressed layer."""
    if isinstance(module, SparseDictionaryLinear):
        return module.dense_weight()
    return (module.down.T @ module.dense_V()).T


def densify_layers(model: nn.Module) -> list[str]:
    """Replace every compressed layer (any form) by an ``nn.Linear`` holding ``W_hat``; returns their names."""
    names = []
    for name, module in compressed_layers(model).items():
        weight = dense_weight(module).detach()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_module(model, name, linear.requires_grad_(False))
        names.append(name)
    return names


def forget_layers(model: nn.Module, names) -> None:
    """Drop ``names`` (now plain ``nn.Linear``) from the model's rocket ``quantization_config``; without any
    compressed layer left the model is a plain one and loses the config (and its quantizer)."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is None:
        return
    layers = qconfig["layers"] if isinstance(qconfig, dict) else getattr(qconfig, "layers", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    if method != QUANT_METHOD or layers is None:
        return
    for name in names:
        layers.pop(name, None)
    if layers:
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        del model.config.quantization_config
    log.info("no compressed layer left: the model is a plain dense one (save_pretrained writes a standard checkpoint)")
