"""Compact checkpoints: save, load, convert, inspect, re-densify.

A checkpoint (format version 2) is a standard transformers model directory that
``AutoModelForCausalLM.from_pretrained`` loads after ``import rocketlm``:

* ``config.json`` with a ``quantization_config`` ``{"quant_method": "rocket", "format_version": 2,
  "runtime": "auto", "layers": {name: {d_in, d_out, k, s, bias}}}``;
* ``model.safetensors``: compressed layers as ``<name>.U`` (d_in x k), ``<name>.V_values`` (s x d_out),
  ``<name>.V_mask`` (the k x d_out nonzero pattern of V as a packed bitmap, uint8) and ``<name>.bias``;
  every other tensor as in the dense model (tied tensors once);
* the tokenizer, and ``rocketlm.json`` (format version, resolved config, per-layer allocation, stage
  statistics, the weights file's size and sha256).

Format 1 (no ``quantization_config``; same tensors) still loads with :func:`load_compressed` and is
rewritten in place to format 2 by :func:`convert_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rocketlm.allocation.plan import Allocation
from rocketlm.errors import CheckpointError, RocketError
from rocketlm.integration.layers import (FORMAT_VERSION, QUANT_METHOD, compressed_layers, densify_layers,
                                         forget_layers, model_quantization_config, quantization_config_dict,
                                         specs_from_allocation)
from rocketlm.preflight import check_output_dir
from rocketlm.storage import write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "rocketlm.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
READABLE_VERSIONS = (1, FORMAT_VERSION)
_ONE_FILE = "1000GB"  # save_pretrained's shard size: one weights file, as the manifest records


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _unique_state(model: torch.nn.Module):
    """``(name, tensor)`` of every persistent tensor, tied tensors only under their first name."""
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        # on the meta device (an offloaded model) every data_ptr is 0: tied tensors are the same object
        key = id(tensor) if tensor.device.type == "meta" else (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dense_model_bytes(model: torch.nn.Module) -> int:
    """Bytes the same model would take with every targeted layer dense (same dtype, tied tensors once)."""
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in _unique_state(model))
    for module in compressed_layers(model).values():
        stored = module.state_dict()
        total -= sum(stored[key].numel() * stored[key].element_size() for key in ("U", "V_values", "V_mask"))
        total += module.in_features * module.out_features * stored["U"].element_size()
    return total


# ---------------------------------------------------------------------------------------------- save


def save_compressed(result, out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write a checkpoint for a :class:`~rocketlm.pipeline.CompressionResult`; returns the manifest.

    Everything is written into a hidden sibling directory that is renamed to ``out_dir`` only when
    complete, so an interrupted save never looks like a checkpoint (an earlier checkpoint at
    ``out_dir`` is replaced only then). ``out_dir`` must be new, empty or an earlier checkpoint.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite=True)  # the same rules as the CLI's preflight; an earlier checkpoint is replaced
    tmp = _sibling(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_model(result.model, tmp, getattr(result.config, "runtime", "auto"))
        result.tokenizer.save_pretrained(tmp)
        manifest = _manifest(result, tmp / WEIGHTS, extra)
        write_json_atomic(tmp / MANIFEST, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%.1f MB; dense %.1f MB)", out, manifest["weights_file"]["bytes"] / 1e6,
             manifest["dense_weights_bytes"] / 1e6)
    return manifest


def _sibling(out: Path, tag: str) -> Path:
    return out.absolute().parent / f".{out.name}.{tag}"


def _save_model(model, directory: Path, runtime: str) -> None:
    """``save_pretrained`` with the rocket ``quantization_config`` on the config (restored afterwards)."""
    config = model.config
    previous = config.__dict__.get("quantization_config", None)
    config.quantization_config = model_quantization_config(model, runtime)
    try:
        if getattr(model, "rocketlm_offload", None) is not None:  # block by block, never the whole model in memory
            from rocketlm.offload.save import write_offloaded
            write_offloaded(model, directory)
        else:
            model.save_pretrained(directory, max_shard_size=_ONE_FILE)
    finally:
        if previous is None:
            del config.quantization_config
        else:
            config.quantization_config = previous
    if not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"save_pretrained wrote no single {WEIGHTS} in {directory}; cannot record its digest")


def _manifest(result, weights: Path, extra: dict | None) -> dict:
    model = result.model
    return {
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


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an earlier ``out`` is moved aside first and removed after."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- read


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
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} was written by a newer rocketlm; this one "
                              f"reads up to {FORMAT_VERSION}: upgrade rocketlm (pip install -U rocketlm)")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version!r} in {MANIFEST}; "
                              "corrupt checkpoint")
    for key in ("config", "allocation", "weights_file"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path} lacks {key!r}: incomplete checkpoint, re-run compress")
    return manifest


def check_weights(path: str | Path, manifest: dict, verify: bool = True) -> Path:
    """The weights file exists with the recorded size (and, with ``verify``, sha256); returns its path."""
    weights = Path(path) / manifest["weights_file"]["name"]
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: incomplete checkpoint, re-run compress")
    size = weights.stat().st_size
    if size != manifest["weights_file"]["bytes"]:
        raise CheckpointError(f"{weights} has {size} bytes, the manifest says {manifest['weights_file']['bytes']}: "
                              "the file is truncated or was replaced; re-run compress")
    if verify and _sha256(weights) != manifest["weights_file"]["sha256"]:
        raise CheckpointError(f"{weights} does not match its sha256 in {MANIFEST}: the file is corrupt; re-run compress")
    return weights


def _tensor_names(weights: Path) -> list[str]:
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} cannot be read ({exc}): corrupt checkpoint, re-run compress") from exc


def _read_config_json(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG} cannot be read ({exc}); incomplete checkpoint, "
                              "re-run compress") from exc


def checkpoint_quantization_config(path: str | Path, manifest: dict, config: dict) -> dict:
    """The rocket ``quantization_config`` of a checkpoint: from ``config.json`` (format 2) or, for format 1,
    built from the manifest's allocation and the stored tensor names."""
    qconfig = config.get("quantization_config")
    if qconfig is not None:
        if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"{path}/{CONFIG} has a quantization_config that is not rocketlm's; "
                                  "not a rocketlm checkpoint (or its config.json was replaced)")
        return qconfig
    if manifest["rocketlm_format_version"] >= 2:
        raise CheckpointError(f"{path}/{CONFIG} lacks the rocket quantization_config of a format-2 checkpoint; "
                              "its config.json was replaced: re-run compress")
    names = _tensor_names(Path(path) / manifest["weights_file"]["name"])
    layers = specs_from_allocation(Allocation.from_json(manifest["allocation"]), names)
    return quantization_config_dict(layers, manifest["config"].get("runtime", "auto"))


# ---------------------------------------------------------------------------------------------- load


def load_compressed(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
                    runtime: str | None = None):
    """Rebuild ``(model, tokenizer)`` from a checkpoint (format 1 or 2) through ``from_pretrained``.

    The compressed layers run in ``runtime`` (``auto``: the measured fastest on ``device``; ``factored``,
    ``sparse``, ``merged``, ``canonical``); ``None`` takes the checkpoint's own (chosen at compress time,
    default ``auto``). ``verify`` checks the weights' sha256 against the manifest first. The manifest is
    attached as ``model.rocketlm_manifest``, the form of each compressed layer as ``model.rocketlm_forms``.
    """
    from rocketlm.config import RUNTIMES
    from rocketlm.errors import ConfigError

    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    path = Path(path)
    manifest = read_manifest(path)
    check_weights(path, manifest, verify)
    config = _hf_config(path, manifest, runtime)
    model = _from_pretrained(path, config, device, getattr(torch, manifest.get("torch_dtype", "float32")))
    tokenizer = _load_tokenizer(path)
    model.rocketlm_manifest = manifest
    return model.eval(), tokenizer


def _hf_config(path: Path, manifest: dict, runtime: str | None):
    """The model config with the checkpoint's rocket ``quantization_config`` (runtime overridden if given)."""
    from transformers import AutoConfig

    from rocketlm.integration import register

    register()
    qconfig = dict(checkpoint_quantization_config(path, manifest, _read_config_json(path)))
    if runtime is not None:
        qconfig["runtime"] = runtime
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: model config cannot be read ({exc}); incomplete checkpoint") from exc
    config.quantization_config = qconfig
    return config


def _from_pretrained(path: Path, config, device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    placement = {} if torch.device(device).type == "cpu" else {"device_map": str(device)}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                           **placement)
    except RocketError:
        raise
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: the model cannot be loaded ({exc}); corrupt or incomplete checkpoint, "
                              "re-run compress") from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise CheckpointError(f"{path}: {kind.replace('_', ' ')} {keys[:5]}{'...' if len(keys) > 5 else ''} "
                                  f"in {WEIGHTS}; the weights do not match config.json: corrupt checkpoint, "
                                  "re-run compress")
    return model


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: tokenizer cannot be read ({exc}); incomplete checkpoint, "
                              "re-run compress") from exc


# ---------------------------------------------------------------------------------------------- convert, densify


def convert_checkpoint(path: str | Path, verify: bool = True) -> str:
    """Rewrite an older checkpoint in place to the current format; returns a one-line summary.

    Format 1 -> 2 adds the rocket ``quantization_config`` (built from the manifest's allocation) to
    ``config.json`` and bumps the manifest's version; the weights are untouched (same tensor names,
    same sha256). ``config.json`` is rewritten first and the manifest last, each atomically, so an
    interrupted conversion still loads and can simply be run again.
    """
    path = Path(path)
    manifest = read_manifest(path)
    check_weights(path, manifest, verify)
    config = _read_config_json(path)
    version = manifest["rocketlm_format_version"]
    if version == FORMAT_VERSION and "quantization_config" in config:
        return f"{path} is already checkpoint format {FORMAT_VERSION}; nothing to do"
    if "quantization_config" not in config:
        config["quantization_config"] = checkpoint_quantization_config(path, manifest, config)
        write_json_atomic(path / CONFIG, config)
    write_json_atomic(path / MANIFEST, {**manifest, "rocketlm_format_version": FORMAT_VERSION})
    layers = len(config["quantization_config"]["layers"])
    log.info("converted %s from checkpoint format %s to %s", path, version, FORMAT_VERSION)
    return (f"converted {path} from checkpoint format {version} to {FORMAT_VERSION} ({layers} compressed layers in "
            "config.json's quantization_config; weights unchanged)")


def densify(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every compressed layer (any run-time form) by an ``nn.Linear`` holding ``W_hat`` (for other
    runtimes); the layers leave the model's ``quantization_config`` (all gone: a plain dense model)."""
    forget_layers(model, densify_layers(model))
    return model
