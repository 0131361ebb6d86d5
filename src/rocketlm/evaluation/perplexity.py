"""WikiText-2 perplexity, the same function for dense and compressed models.

Protocol: the raw test split's rows joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens (the remainder dropped); perplexity is
``exp`` of the mean token negative log-likelihood over all windows.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rocketlm.calibration.data import DataError, data_dir

log = logging.getLogger(__name__)

WIKITEXT_TEST = Path("wikitext-2-raw") / "wiki.test.raw"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    windows: int
    total_windows: int
    seq_len: int
    tokens: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def wikitext2_rows(path: str | Path) -> list[str]:
    """Dataset rows of the raw file: one row per line (newline kept), blank lines as ``""``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"WikiText-2 test file {path} not found; set $ROCKETLM_DATA to the data directory "
                        f"containing {WIKITEXT_TEST}")
    with path.open(encoding="utf-8", newline="") as handle:
        return [line if line.strip() else "" for line in handle]


def wikitext2_text(explicit_data_dir: str | None = None) -> str:
    return "\n\n".join(wikitext2_rows(data_dir(explicit_data_dir) / WIKITEXT_TEST))


def token_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """All non-overlapping windows, shape (n, seq_len)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, limit: int | None = None, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Mean-token-NLL perplexity of ``model`` over ``windows`` (the first ``limit`` if given)."""
    total = windows.shape[0]
    use = windows[: limit] if limit else windows
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, use.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = use[i: i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss on perplexity window {i}: the model produces NaN/Inf logits")
        nll_sum += float(nll)
        count += ids[:, 1:].numel()
    mean_nll = nll_sum / count
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, windows=use.shape[0],
                            total_windows=total, seq_len=use.shape[1], tokens=count,
                            seconds=time.perf_counter() - start)
