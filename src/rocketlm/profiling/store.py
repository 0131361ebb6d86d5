"""Resumable, hash-keyed stores for the two expensive stages.

* :class:`GramStore`: one safetensors file per decoder block with that block's float64 Grams.
* :class:`ProfileStore`: one JSON line per profiled layer, appended (and fsynced) as it is computed.

Both live under ``<cache_dir>/<kind>/<key>/``, where ``key`` hashes everything the result
depends on, so an interrupted run resumes where it stopped and a changed configuration never
reuses stale results.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rocketlm.calibration.grams import BlockGrams
from rocketlm.profiling.profile import LayerProfile

log = logging.getLogger(__name__)


def stable_hash(*parts) -> str:
    """Hex digest of JSON-serialisable parts and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((tuple(part.shape), str(part.dtype))).encode())
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class GramStore:
    def __init__(self, root: Path, key: str, meta: dict):
        self.dir = Path(root) / "grams" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))

    def _path(self, block: int) -> Path:
        return self.dir / f"block_{block:04d}.safetensors"

    def has(self, block: int) -> bool:
        return self._path(block).is_file()

    def put(self, block: int, grams: BlockGrams) -> None:
        tensors = {group: gram.cpu().contiguous() for group, gram in grams.grams.items()}
        metadata = {"group_of": json.dumps(grams.group_of), "tokens": str(grams.tokens)}
        _write_atomic(self._path(block), lambda p: save_file(tensors, str(p), metadata=metadata))

    def get(self, block: int, device: str | torch.device = "cpu") -> BlockGrams:
        path = self._path(block)
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata()
            grams = {name: handle.get_tensor(name) for name in handle.keys()}
        return BlockGrams(grams=grams, group_of=json.loads(meta["group_of"]), tokens=int(meta["tokens"]))


class ProfileStore:
    def __init__(self, root: Path, key: str, meta: dict):
        self.dir = Path(root) / "profiles" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "layers.jsonl"
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
        self.layers: dict[str, LayerProfile] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with self.path.open("rb") as handle:
            for raw in handle:
                try:
                    profile = LayerProfile.from_json(json.loads(raw))
                except (json.JSONDecodeError, TypeError, KeyError):
                    log.warning("profile store %s: dropping a truncated line (interrupted write)", self.path)
                    break
                self.layers[profile.name] = profile
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("rb+") as handle:
                handle.truncate(good_bytes)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def put(self, profile: LayerProfile) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(profile.to_json()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.layers[profile.name] = profile
