"""Data-parallel calibration: each rank forwards its share of the windows; per block, the float64
Grams and token counts are summed over the ranks (``all_reduce``) and written by one rank.

The result equals the single-process Grams up to the order of the float64 summation: every
rank forwards whole batches of the single-process batching, so each batch's contribution is
computed identically; only the batch sums are added in another order.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from rocketlm.calibration.grams import BlockGrams, iterate_block_grams
from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.distributed.assign import batch_share
from rocketlm.distributed.context import DistContext
from rocketlm.errors import CalibrationError
from rocketlm.models.discovery import DecoderStructure

log = logging.getLogger(__name__)


def _signature(grams: BlockGrams) -> dict:
    return {"group_of": grams.group_of, "shapes": {g: list(t.shape) for g, t in sorted(grams.grams.items())}}


def missing_blocks(store: GramStore, n_blocks: int, dist: DistContext) -> list[int]:
    """Blocks missing from the store of any rank (a node without the shared cache recomputes)."""
    with dist.step("reading the Gram cache"):
        local = {b for b in range(n_blocks) if not store.has(b)}
    return sorted(set().union(*dist.all_gather(local)))


def reduce_block(b: int, grams: BlockGrams, dist: DistContext) -> BlockGrams:
    """Sum one block's Grams and token count over the ranks, in place (every rank gets the sum)."""
    device = next(iter(grams.grams.values())).device
    tokens = torch.tensor([grams.tokens], dtype=torch.int64, device=device)
    dist.all_reduce_sum_([grams.grams[g] for g in sorted(grams.grams)] + [tokens])
    grams.tokens = int(tokens.item())
    return grams


def _block_step(b: int, blocks, dist: DistContext) -> BlockGrams | None:
    """Advance the local forward by one block and check every rank produced the same Gram layout."""
    error, grams = None, None
    try:
        _, grams = next(blocks)
    except Exception as exc:  # reported to every rank by sync
        error = exc
    signatures = dist.sync(f"calibrating block {b}", error, None if grams is None else _signature(grams))
    if any(s != signatures[0] for s in signatures):
        raise CalibrationError(f"block {b}: the ranks found different Gram groups or shapes ({signatures}); "
                               "every process must load the same model")
    return grams


def calibrate_parallel(model, structure: DecoderStructure, windows: torch.Tensor, config: RocketConfig,
                       store: GramStore, progress: bool, dist: DistContext, after_block=None) -> None:
    """Accumulate the missing blocks' Grams over every rank's share of ``windows``; store writers save them.
    ``after_block(b)``: called once block ``b``'s Grams are handed out (an offloaded model moves on to the
    next block there)."""
    n_blocks = len(structure.blocks)
    writer = dist.is_writer(store.dir)
    missing = missing_blocks(store, n_blocks, dist)
    if not missing:
        log.info("calibration: all %d blocks cached in %s", n_blocks, store.dir)
        return
    start, stop = batch_share(windows.shape[0], config.calib_batch_size, dist.rank, dist.world_size)
    log.info("calibration: %s forwards windows %d..%d of %d%s", dist.tag, start, stop - 1, windows.shape[0],
             ", writes the Gram cache" if writer else "")
    skip = set(range(n_blocks)) - set(missing)
    desc = "calibration (blocks)" + (f", {dist.tag}: windows {start}..{stop - 1}" if dist.distributed else "")
    with tqdm(total=max(missing) + 1, desc=desc, disable=not progress) as bar:
        blocks = iterate_block_grams(model, structure, windows[start:stop], config.calib_batch_size, skip, bar)
        try:
            for b in range(max(missing) + 1):
                grams = _block_step(b, blocks, dist)
                if grams is not None:
                    reduce_block(b, grams, dist)
                    with dist.step(f"writing the Grams of block {b}"):
                        if writer and not store.has(b):
                            store.put(b, grams)
                del grams  # before the next block's Grams are accumulated
                if after_block is not None:
                    after_block(b)
        finally:
            blocks.close()
