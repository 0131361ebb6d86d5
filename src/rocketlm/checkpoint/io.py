"""Compact checkpoints: save, load, inspect, re-densify.

A checkpoint directory holds the HF model config, the tokenizer, ``model.safetensors`` and
``rocketlm.json`` (format version, resolved config, per-layer allocation, file digest).
Compressed layers are stored as ``<name>.U`` (d_in x k), ``<name>.V_values`` (s x d_out) and
``<name>.V_mask`` (the k x d_out nonzero pattern of V as a packed bitmap, uint8); every other
tensor is stored as in the dense model (tied tensors once).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rocketlm.allocation.plan import Allocation
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.config import FORMAT_VERSION
from rocketlm.errors import CheckpointError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MANIFEST = "rocketlm.json"
WEIGHTS = "model.safetensors"




def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _compressed_modules(model: torch.nn.Module) -> dict[str, SparseDictionaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDictionaryLinear)}


def _unique_state(model: torch.nn.Module):
    """``(name, tensor)`` of every persistent tensor, tied tensors only under their first name."""
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor once (tied tensors under their first name), compressed layers packed."""
    return {name: tensor.detach().contiguous().cpu() for name, tensor in _unique_state(model)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dense_model_bytes(model: torch.nn.Module) -> int:
    """Bytes the same model would take with every targeted layer dense (same dtype, tied tensors once)."""
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in _unique_state(model))
    for module in _compressed_modules(model).values():
        element = module.U.element_size()
        total -= (module.U.numel() + module.V_values.numel()) * element + module.V_mask.numel()
        total += module.in_features * module.out_features * element
    return total


def save_compressed(result, out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write a checkpoint for a :class:`~rocketlm.pipeline.CompressionResult`; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = result.model
    model.config.save_pretrained(out)
    result.tokenizer.save_pretrained(out)
    weights = out / WEIGHTS
    save_file(_state_tensors(model), str(weights), metadata={"format": "pt", "rocketlm_format": str(FORMAT_VERSION)})
    manifest = {
        "rocketlm_format_version": FORMAT_VERSION,
        "config": result.config.to_dict(),
        "allocation": result.allocation.to_json(),
        "stages": {name: s.to_json() for name, s in result.stats.items()},
        "keys": vars(result.keys) if result.keys else None,
        "checks": result.checks,
        "weights_file": {"name": WEIGHTS, "bytes": weights.stat().st_size, "sha256": _sha256(weights)},
        "dense_weights_bytes": dense_model_bytes(model),
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log.info("saved %s (%.1f MB; dense %.1f MB)", out, manifest["weights_file"]["bytes"] / 1e6,
             manifest["dense_weights_bytes"] / 1e6)
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: not a rocketlm checkpoint (write one with `rocketlm compress --out`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}); the checkpoint is corrupt: re-run compress") from exc
    version = manifest.get("rocketlm_format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this rocketlm reads {FORMAT_VERSION}")
    for key in ("config", "allocation", "weights_file"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path} lacks {key!r}: incomplete checkpoint, re-run compress")
    return manifest


def _read_weights(path: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    weights = path / manifest["weights_file"]["name"]
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: incomplete checkpoint, re-run compress")
    size = weights.stat().st_size
    if size != manifest["weights_file"]["bytes"]:
        raise CheckpointError(f"{weights} has {size} bytes, the manifest says {manifest['weights_file']['bytes']}: "
                              "the file is truncated or was replaced; re-run compress")
    if verify and _sha256(weights) != manifest["weights_file"]["sha256"]:
        raise CheckpointError(f"{weights} does not match its sha256 in {MANIFEST}: the file is corrupt; re-run compress")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} cannot be read ({exc}): corrupt checkpoint, re-run compress") from exc


def load_compressed(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """Rebuild ``(model, tokenizer)`` from a checkpoint with the compact modules in place."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    tensors = _read_weights(path, manifest, verify)
    allocation = Allocation.from_json(manifest["allocation"])
    dtype = getattr(torch, manifest.get("torch_dtype", "float32"))
    try:
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: model config or tokenizer cannot be read ({exc}); incomplete checkpoint") from exc
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for choice in allocation.choices:
        if choice.dense:
            continue
        prefix = choice.name
        if f"{prefix}.V_mask" not in tensors:
            raise CheckpointError(f"{path}: tensors of compressed layer {prefix} are missing; corrupt checkpoint")
        module = SparseDictionaryLinear(choice.d_in, choice.d_out, choice.k, choice.s,
                                        bias=f"{prefix}.bias" in tensors, dtype=dtype, device="meta")
        replace_module(model, prefix, module)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}...; the checkpoint does not match its config")
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors {still_meta[:5]} are missing from {WEIGHTS}; corrupt checkpoint")
    model.rocketlm_manifest = manifest
    return model.to(device).eval(), tokenizer


def densify(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every compressed module by an ``nn.Linear`` holding ``W_hat`` (for other runtimes)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseDictionaryLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     dtype=module.U.dtype, device=module.U.device)
            with torch.no_grad():
                linear.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
    return model
