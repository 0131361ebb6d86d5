"""Calibration kernels timed on one decoder block with the real shapes.

The calibration stage first reads and tokenizes the calibration data and checksums the target
weights (the cache key); :func:`probe_data` and :func:`probe_fingerprint` time those. Then
:func:`rocketlm.calibration.grams.iterate_block_grams` runs, per batch
shape, one full forward to capture the blocks' keyword arguments (every block and the lm_head),
then for every block and batch the block's forward with the Gram hooks. The probe times the same
calls on a one-block model: the block alone, the block with :class:`GramAccumulator` hooks, and
the lm_head product on a slice of the vocabulary (scaled to the whole), on one probe batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rocketlm.calibration.data import default_calib_files
from rocketlm.calibration.grams import GramAccumulator, block_kwargs, first_block_inputs
from rocketlm.calibration.run import calibration_windows
from rocketlm.calibration.sequential import DENSE_INPUTS_BYTES, iterate_sequential_grams
from rocketlm.config import RocketConfig
from rocketlm.errors import RocketError
from rocketlm.estimation.describe import ModelDescription, Probe
from rocketlm.estimation.timing import current_rss, measure, timed
from rocketlm.storage import model_fingerprint

log = logging.getLogger(__name__)

HEAD_CHUNK = 16384  # lm_head rows timed (the time is scaled to the whole vocabulary)


@dataclass(frozen=True)
class CalibrationProbe:
    """Times (seconds) and memory of one probe batch of ``batch`` x ``seq_len`` tokens."""

    batch: int
    seq_len: int
    forward_s: float  # one block forward
    grams_s: float  # the same forward with the Gram hooks (float64 accumulation included)
    head_s: float  # the lm_head product on the whole vocabulary
    probe_gram_flops: int  # sum of d_in^2 over the probe block's Gram groups (every linear's input)
    gram_dtype: str = "float64"  # the dtype of the Gram update's GEMMs
    # ``--sequential``: the sequential calibration pass through the block, per batch and once per block
    sequential_s: float | None = None
    sequential_block_s: float = 0.0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def gram_dtype(activation_dtype: torch.dtype) -> str:
    """The dtype the Gram update's GEMMs run in (``gram_work_dtype`` where calibration defines it)."""
    try:
        from rocketlm.calibration.grams import gram_work_dtype
    except ImportError:  # every Gram GEMM in float64
        return "float64"
    return str(gram_work_dtype(activation_dtype)).removeprefix("torch.")


def probe_batch_shape(batch: int, seq_len: int, max_tokens: int) -> tuple[int, int]:
    """The probe batch: the real one if it has at most ``max_tokens`` tokens, else fewer windows,
    else one shorter window."""
    if batch * seq_len <= max_tokens:
        return batch, seq_len
    return max(1, max_tokens // seq_len), min(seq_len, max_tokens)


def _head_seconds(hidden: torch.Tensor, vocab: int, repeats: int) -> float:
    chunk = min(vocab, HEAD_CHUNK)
    weight = torch.randn(chunk, hidden.shape[-1], device=hidden.device).mul_(0.02).to(hidden.dtype)
    seconds = measure(lambda: F.linear(hidden, weight), repeats, hidden.device)
    return seconds * vocab / chunk


@torch.no_grad()
def probe_calibration(probe: Probe, description: ModelDescription, batch: int, seq_len: int,
                      max_tokens: int = 4096, repeats: int = 3, sequential: bool = False, cross: bool = False,
                      calib_tokens: int = 0) -> CalibrationProbe:
    """Time one probe batch through the probe block, without and with the Gram hooks, and with ``sequential``
    through the sequential calibration pass (:func:`probe_sequential`; ``cross``: with the dense stream of the
    upstream correction, for a run of ``calib_tokens`` calibration tokens)."""
    b, L = probe_batch_shape(batch, seq_len, max_tokens)
    device = next(probe.model.parameters()).device
    ids = torch.randint(0, probe.model.config.get_text_config().vocab_size, (b, L), device=device)
    kwargs = block_kwargs(probe.model, probe.structure, ids)[0]
    hidden = first_block_inputs(probe.model, probe.structure, [ids])[0]
    block = probe.block
    forward_s = measure(lambda: block(hidden, **kwargs), repeats, device)
    modules = dict(probe.model.named_modules())
    accumulator = GramAccumulator({name: modules[name] for name in probe.structure.targets[0]})

    def hooked():
        block(hidden, **kwargs)
        accumulator.end_batch(ids.numel())

    try:
        grams_s = measure(hooked, repeats, device)
    finally:
        accumulator.remove()
    gram_width = sum(g.shape[0] ** 2 for g in accumulator.result.grams.values())
    head_s = _head_seconds(hidden, description.vocab_size, repeats)
    sequential_s, sequential_block_s = None, 0.0
    if sequential:
        fits = description.dense_inputs_bytes(calib_tokens) <= DENSE_INPUTS_BYTES
        sequential_s, sequential_block_s = probe_sequential(probe, ids, cross, fits, repeats)
    result = CalibrationProbe(b, L, forward_s, grams_s, head_s, gram_width, gram_dtype(hidden.dtype), sequential_s,
                              sequential_block_s)
    log.info("calibration probe %dx%d: block forward %.3f s, with Grams %.3f s, lm_head %.3f s%s", b, L,
             forward_s, grams_s, head_s, "" if sequential_s is None else
             f", sequential pass {sequential_s:.3f} s per batch + {sequential_block_s:.3f} s per block")
    return result


def probe_sequential(probe: Probe, ids: torch.Tensor, cross: bool, dense_inputs_fit: bool = True,
                     repeats: int = 3, batches: int = 4) -> tuple[float, float]:
    """``(seconds per batch, seconds per block)`` of
    :func:`~rocketlm.calibration.sequential.iterate_sequential_grams` through the probe block (every Gram group
    staged, nothing compressed in between): the forwards up to each group's input with its Gram, the block's
    output and, with ``cross``, the dense stream and the cross-Grams, its dense inputs kept
    (``dense_inputs_fit``, as the run keeps them when they fit) or recomputed per group. Timed on one batch
    ``ids`` and on ``batches`` of them: the difference is the per-batch cost, the rest is paid once per block
    (the block's copy, the forward that orders its groups)."""
    names = probe.structure.targets[0]

    def run(windows: torch.Tensor) -> float:
        def once():
            for _ in iterate_sequential_grams(probe.model, probe.structure, windows, ids.shape[0], names, cross=cross,
                                              max_stored_bytes=DENSE_INPUTS_BYTES if dense_inputs_fit else 0):
                pass
        return measure(once, repeats, ids.device)
    one, several = run(ids), run(ids.repeat(batches, 1))
    per_batch = max(0.0, several - one) / (batches - 1)
    return per_batch, max(0.0, one - per_batch)


def probe_fingerprint(probe: Probe, description: ModelDescription, repeats: int = 3) -> float:
    """Seconds of the cache key's checksum of every target weight (:func:`model_fingerprint`), timed on
    the probe block and scaled by the targeted parameters."""
    names = probe.structure.targets[0]
    modules = dict(probe.model.named_modules())
    probe_params = sum(modules[n].weight.numel() for n in names)
    seconds = measure(lambda: model_fingerprint(probe.model, [f"{n}.weight" for n in names]), repeats)
    return seconds * sum(x.d_in * x.d_out for x in description.layers) / max(1, probe_params)


@dataclass(frozen=True)
class DataProbe:
    seconds: float  # reading, tokenizing and sampling the calibration windows
    rss_bytes: int  # resident growth it leaves (tokenizer, corpus)


def probe_data(model: str, config: RocketConfig, data_dir: str | None) -> DataProbe | None:
    """Time :func:`calibration_windows` (the real data, the model's tokenizer), or None when the
    tokenizer or the calibration files are not at hand (or the data is a hub dataset)."""
    from transformers import AutoTokenizer

    from rocketlm.models.loading import resolve_source

    if config.calib_dataset:
        return None
    try:
        source = resolve_source(str(Path(model).parent) if model.endswith(".json") else model)
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
        if not config.calib_files:
            default_calib_files(data_dir)
    except (RocketError, OSError, ValueError, TypeError) as exc:
        log.info("calibration data not timed: %s", exc)
        return None
    before = current_rss()
    try:
        seconds = timed(lambda: calibration_windows(tokenizer, config, data_dir))
    except RocketError as exc:  # e.g. a config-only directory whose tokenizer came out empty
        log.info("calibration data not timed: %s", exc)
        return None
    return DataProbe(seconds, max(0, current_rss() - before))
