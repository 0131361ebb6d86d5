"""The profiling cache: one JSON line per profiled layer, appended (and fsynced) as it is computed.

It lives under ``<cache_dir>/profiles/<key>/``, where ``key`` hashes everything the profiles
depend on (calibration key, grid, factorization settings), so an interrupted run resumes at the
first missing layer and a changed configuration never reuses stale results.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rocketlm.profiling.profile import LayerProfile
from rocketlm.storage import write_json_atomic

log = logging.getLogger(__name__)


class ProfileStore:
    def __init__(self, root: Path, key: str, meta: dict):
        self.dir = Path(root) / "profiles" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "layers.jsonl"
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            write_json_atomic(meta_path, meta)
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
