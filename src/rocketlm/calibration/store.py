"""The calibration cache: one safetensors file per decoder block with that block's float64 Grams.

It lives under ``<cache_dir>/grams/<key>/``, where ``key`` hashes the model weights, the
calibration windows and the targets, so an interrupted run resumes at the first missing block
and a changed input never reuses stale Grams.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rocketlm.calibration.grams import BlockGrams
from rocketlm.storage import write_atomic, write_json_atomic


class GramStore:
    def __init__(self, root: Path, key: str, meta: dict):
        self.dir = Path(root) / "grams" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "meta.json").exists():
            write_json_atomic(self.dir / "meta.json", meta)

    def _path(self, block: int) -> Path:
        return self.dir / f"block_{block:04d}.safetensors"

    def has(self, block: int) -> bool:
        return self._path(block).is_file()

    def put(self, block: int, grams: BlockGrams) -> None:
        tensors = {group: gram.cpu().contiguous() for group, gram in grams.grams.items()}
        metadata = {"group_of": json.dumps(grams.group_of), "tokens": str(grams.tokens)}
        write_atomic(self._path(block), lambda p: save_file(tensors, str(p), metadata=metadata))

    def group_of(self, block: int) -> dict[str, str]:
        """Which Gram group each target layer of ``block`` reads (from the file's header only)."""
        with safe_open(str(self._path(block)), framework="pt") as handle:
            return json.loads(handle.metadata()["group_of"])

    def get_group(self, block: int, group: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One Gram of ``block`` (the others stay on disk)."""
        with safe_open(str(self._path(block)), framework="pt", device=str(device)) as handle:
            return handle.get_tensor(group)

    def get(self, block: int, device: str | torch.device = "cpu") -> BlockGrams:
        with safe_open(str(self._path(block)), framework="pt", device=str(device)) as handle:
            meta = handle.metadata()
            grams = {name: handle.get_tensor(name) for name in handle.keys()}
        return BlockGrams(grams=grams, group_of=json.loads(meta["group_of"]), tokens=int(meta["tokens"]))
