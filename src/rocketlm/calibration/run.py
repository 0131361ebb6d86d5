"""The calibration stage: draw token windows, accumulate every block's Grams into a :class:`GramStore`."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.calibration.data import (default_calib_files, files_fingerprint, hub_dataset_corpus, sample_windows,
                                       tokenize_corpus)
from rocketlm.calibration.grams import iterate_block_grams
from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.models.discovery import DecoderStructure

log = logging.getLogger(__name__)


def calibration_windows(tokenizer, config: RocketConfig, data_dir: str | None = None) -> tuple[torch.Tensor, dict]:
    """Token windows (calib_samples x calib_seq_len) and a description of their source."""
    if config.calib_dataset:
        corpus = hub_dataset_corpus(tokenizer, config.calib_dataset)
        source = {"dataset": config.calib_dataset}
    else:
        files = config.calib_files or default_calib_files(data_dir)
        corpus = tokenize_corpus(tokenizer, tuple(files))
        source = {"files": [Path(f).name for f in files], "fingerprint": files_fingerprint(tuple(files))}
    windows = sample_windows(corpus, config.calib_samples, config.calib_seq_len, config.seed)
    return windows, source


def run_calibration(model, structure: DecoderStructure, windows: torch.Tensor, config: RocketConfig,
                    store: GramStore, progress: bool = True, dist=None) -> None:
    """Accumulate and store the Grams of every block not yet in ``store``.

    ``dist``: a :class:`rocketlm.distributed.DistContext`; with several processes each forwards its
    share of ``windows`` and the Grams are summed over them (``rocketlm.distributed.calibration``)."""
    if dist is not None and dist.distributed:
        from rocketlm.distributed.calibration import calibrate_parallel
        return calibrate_parallel(model, structure, windows, config, store, progress, dist)
    missing = {b for b in range(len(structure.blocks)) if not store.has(b)}
    if not missing:
        log.info("calibration: all %d blocks cached in %s", len(structure.blocks), store.dir)
        return
    skip = set(range(len(structure.blocks))) - missing
    with tqdm(total=max(missing) + 1, desc="calibration (blocks)", disable=not progress) as bar:
        for b, grams in iterate_block_grams(model, structure, windows, config.calib_batch_size, skip, bar):
            if grams is not None:
                store.put(b, grams)
