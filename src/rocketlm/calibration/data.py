"""Text sources -> seeded token windows for calibration."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from rocketlm.errors import DataError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DATA_ENV = "ROCKETLM_DATA"
_DOC_TAG = re.compile(r"</?doc[^>]*>")




def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data directory: ``explicit``, else ``$ROCKETLM_DATA``."""
    value = explicit or os.environ.get(DATA_ENV)
    if not value:
        raise DataError(f"no data directory: set {DATA_ENV}=/path/to/data (e.g. ../shared/data) or pass --data")
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist (from --data or ${DATA_ENV})")
    return path


def default_calib_files(explicit_data_dir: str | None = None) -> tuple[str, ...]:
    """The text files in ``<data>/calib/`` (sorted, so the corpus order is stable)."""
    calib = data_dir(explicit_data_dir) / "calib"
    files = sorted(str(p) for p in calib.glob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise DataError(f"no .txt/.jsonl calibration files in {calib}; pass --calib FILE...")
    return tuple(files)


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of one file: ``.jsonl`` rows' ``text`` field, or a ``.txt`` split on ``<doc>`` tags."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field ({exc})") from exc
        return docs
    if path.suffix != ".txt":
        raise DataError(f"calibration file {path}: unsupported type; use .txt or .jsonl (with a 'text' field)")
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in _DOC_TAG.split(text) if d.strip()]


def files_fingerprint(files: tuple[str, ...]) -> str:
    """Content hash of the calibration files (so an edited file never reuses stale statistics)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(Path(name).name.encode())
        digest.update(hashlib.sha256(Path(name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def tokenize_corpus(tokenizer, files: tuple[str, ...]) -> torch.Tensor:
    """All documents of all files, joined with blank lines and tokenized once (1-D int64)."""
    docs = [doc for name in files for doc in read_documents(name)]
    if not docs:
        raise DataError(f"calibration files {list(files)} contain no text")
    ids = tokenizer("\n\n".join(docs), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.int64)


def sample_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens (seeded), shape (samples, seq_len)."""
    n = token_ids.numel()
    if n <= seq_len:
        raise DataError(f"calibration corpus has {n} tokens, fewer than one window of {seq_len}; "
                        "add text or lower --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (samples,), generator=gen)
    return torch.stack([token_ids[s: s + seq_len] for s in starts.tolist()])


def hub_dataset_corpus(tokenizer, name: str, split: str = "train", max_chars: int = 20_000_000) -> torch.Tensor:
    """Token ids from a HuggingFace dataset with a ``text`` column (needs network access)."""
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split, streaming=True)
        texts, total = [], 0
        for row in ds:
            texts.append(row["text"])
            total += len(row["text"])
            if total >= max_chars:
                break
    except Exception as exc:  # the hub raises many types when offline
        raise DataError(f"could not read dataset {name!r} from the HuggingFace hub ({exc}); when offline, "
                        f"pass local files with --calib FILE... or set ${DATA_ENV}") from exc
    return tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
