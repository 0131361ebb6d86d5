"""Small helpers every stage's store shares: atomic writes, content hashes, model fingerprints."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


CACHE_ENV = "ROCKETLM_CACHE"


def default_cache_dir() -> Path:
    """Where Grams, profiles and run-time form tables are cached: ``$ROCKETLM_CACHE`` or ``~/.cache/rocketlm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rocketlm")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place, so a reader
    never sees a half-written file (an interrupted write leaves only the ``.tmp``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, default=str))


def stable_hash(*parts) -> str:
    """Hex digest (20 characters) of JSON-serialisable parts and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((tuple(part.shape), str(part.dtype))).encode())
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def model_fingerprint(model: torch.nn.Module, tensor_names: Iterable[str] | None = None) -> str:
    """Hash of the model's config and a checksum (shape, sum, sum of squares, max |x|) of the named
    tensors (``None``: every parameter and buffer). Cheap: no tensor is serialised."""
    config = getattr(model, "config", None)
    parts: list = [config.to_json_string(use_diff=False) if config is not None else type(model).__name__]
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    names = list(tensors) if tensor_names is None else list(tensor_names)
    with torch.no_grad():
        for name in names:
            t = tensors[name].detach().to(torch.float64)
            parts.append([name, list(t.shape), float(t.sum()), float(t.square().sum()),
                          float(t.abs().max()) if t.numel() else 0.0])
    return stable_hash(*parts)
