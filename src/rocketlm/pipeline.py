"""Orchestration of a compression run: calibration -> profiling -> allocation -> compression.

Each stage takes the previous stage's result; the two expensive stages are cached in
hash-keyed stores under ``cache_dir`` so that an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rocketlm.allocation.plan import Allocation, allocate
from rocketlm.calibration.data import (default_calib_files, files_fingerprint, hub_dataset_corpus,
                                       sample_windows, tokenize_corpus)
from rocketlm.calibration.grams import iterate_block_grams
from rocketlm.compression.modules import SparseDictionaryLinear
from rocketlm.config import RocketConfig
from rocketlm.factorization.sparse_dictionary import direct_errors, factorize_candidate, layer_basis, whitening_factor
from rocketlm.models.discovery import DecoderStructure, decoder_structure
from rocketlm.monitor import StageStats, stage
from rocketlm.profiling.profile import LayerProfile, profile_layer
from rocketlm.profiling.store import GramStore, ProfileStore, stable_hash

log = logging.getLogger(__name__)

CACHE_ENV = "ROCKETLM_CACHE"


class ErrorMismatchError(RuntimeError):
    """The factors built for shipping do not reproduce the profiled error."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rocketlm")


@dataclass
class RunKeys:
    model: str
    calibration: str
    profile: str


@dataclass
class CompressionResult:
    model: torch.nn.Module
    tokenizer: object
    config: RocketConfig
    allocation: Allocation
    profiles: list[LayerProfile]
    stats: dict[str, StageStats] = field(default_factory=dict)
    keys: RunKeys | None = None
    checks: dict = field(default_factory=dict)


def _value_dtype(model: torch.nn.Module, config: RocketConfig) -> torch.dtype:
    return getattr(torch, config.save_dtype) if config.save_dtype else next(model.parameters()).dtype


def _weight(module: torch.nn.Linear) -> torch.Tensor:
    """``W`` in ROCKET notation (d_in x d_out), float64."""
    return module.weight.detach().to(torch.float64).T


def model_fingerprint(model: torch.nn.Module, structure: DecoderStructure) -> str:
    """Hash of the architecture config and a content checksum of every targeted weight."""
    modules = dict(model.named_modules())
    parts = [model.config.to_json_string(use_diff=False) if hasattr(model, "config") else type(model).__name__]
    for name in structure.all_targets:
        W = modules[name].weight.detach().to(torch.float64)
        parts.append([name, list(W.shape), float(W.sum()), float((W * W).sum()), float(W.abs().max())])
    return stable_hash(*parts)


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


def run_keys(model_key: str, windows: torch.Tensor, structure: DecoderStructure, config: RocketConfig,
             value_dtype: torch.dtype) -> RunKeys:
    calib = stable_hash(model_key, windows, list(structure.all_targets))
    profile = stable_hash(calib, config.grid.removed_ratios, config.grid.ks, config.whitening_eps,
                          config.ridge_rel, config.importance_power, config.profile_dtype, str(value_dtype))
    return RunKeys(model_key, calib, profile)


def run_calibration(model, structure: DecoderStructure, windows: torch.Tensor, config: RocketConfig,
                    store: GramStore, progress: bool = True) -> None:
    """Accumulate and store the Grams of every block not yet in ``store``."""
    missing = {b for b in range(len(structure.blocks)) if not store.has(b)}
    if not missing:
        log.info("calibration: all %d blocks cached in %s", len(structure.blocks), store.dir)
        return
    skip = set(range(len(structure.blocks))) - missing
    with tqdm(total=max(missing) + 1, desc="calibration (blocks)", disable=not progress) as bar:
        for b, grams in iterate_block_grams(model, structure, windows, config.calib_batch_size, skip, bar):
            if grams is not None:
                store.put(b, grams)


def _whitened_layers(structure: DecoderStructure, grams_store: GramStore, wanted, eps: float, device):
    """Yield ``(name, S, group)`` for every target layer with ``wanted(name)``, block by block: each
    block's Grams are loaded once and each Gram group is whitened once, only when a layer needs it."""
    for b, names in enumerate(structure.targets):
        names = [n for n in names if wanted(n)]
        if not names:
            continue
        grams = grams_store.get(b, device)
        factors: dict[str, torch.Tensor] = {}
        for name in names:
            group = grams.group_of[name]
            if group not in factors:
                factors[group] = whitening_factor(grams.grams[group], eps)
            yield name, factors[group], group


def run_profiling(model, structure: DecoderStructure, grams_store: GramStore, store: ProfileStore,
                  config: RocketConfig, value_dtype: torch.dtype, progress: bool = True) -> list[LayerProfile]:
    """Profile every target layer not yet in ``store``; returns all profiles in model order."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    value_bytes = torch.tensor([], dtype=value_dtype).element_size()
    todo = [name for name in structure.all_targets if name not in store]
    with tqdm(total=len(structure.all_targets), initial=len(structure.all_targets) - len(todo),
              desc="profiling (layers)", disable=not progress) as bar:
        for name, S, group in _whitened_layers(structure, grams_store, lambda n: n not in store,
                                               config.whitening_eps, device):
            start = time.perf_counter()
            profile = profile_layer(name, _weight(modules[name]), S, config.grid, group=group,
                                    value_bytes=value_bytes, ridge_rel=config.ridge_rel,
                                    importance_power=config.importance_power, dtype=dtype)
            profile.seconds = time.perf_counter() - start
            store.put(profile)
            bar.update(1)
    return [store.layers[name] for name in structure.all_targets]


def apply_allocation(model, structure: DecoderStructure, allocation: Allocation, grams_store: GramStore,
                     config: RocketConfig, value_dtype: torch.dtype, progress: bool = True) -> dict:
    """Factor every non-dense layer with its chosen candidate and swap in the compressed module.

    The factorization is the profiled one (same function, same dtype); its errors must agree
    with the profiled errors, and the errors recomputed from the shipped ``U V`` in float64
    must agree too (within float32 rounding of the profiling algebra).
    """
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    by_name = {c.name: c for c in allocation.choices}
    worst = {"profile_vs_shipped": 0.0, "profile_vs_direct": 0.0}
    with tqdm(total=sum(not c.dense for c in allocation.choices), desc="compression (layers)",
              disable=not progress) as bar:
        chosen = {n for n, c in by_name.items() if not c.dense}
        for name, S, _ in _whitened_layers(structure, grams_store, chosen.__contains__, config.whitening_eps, device):
            choice, linear = by_name[name], modules[name]
            W = _weight(linear)
            basis = layer_basis(W, S, importance_power=config.importance_power, dtype=dtype)
            fact = factorize_candidate(basis, choice.k, choice.s, ridge_rel=config.ridge_rel, with_factors=True)
            module = SparseDictionaryLinear.from_factors(fact.U, fact.V, fact.mask, choice.s, linear.bias,
                                                         value_dtype)
            e_w, e_o = direct_errors(W, S, module.U.double() @ module.dense_V().double())
            _check_agreement(name, worst, choice, fact, e_w, e_o)
            _set_module(model, name, module.to(device))
            bar.update(1)
    return worst


def _check_agreement(name, worst, choice, fact, e_w, e_o) -> None:
    shipped = max(abs(fact.error_weight - choice.error_weight), abs(fact.error_output - choice.error_output))
    direct = max(abs(e_w - choice.error_weight), abs(e_o - choice.error_output))
    worst["profile_vs_shipped"] = max(worst["profile_vs_shipped"], shipped)
    worst["profile_vs_direct"] = max(worst["profile_vs_direct"], direct)
    if shipped > 1e-4 + 1e-3 * choice.error_weight or direct > 5e-3 + 2e-2 * max(e_w, e_o):
        raise ErrorMismatchError(
            f"{name}: profiled errors (weight {choice.error_weight:.5f}, output {choice.error_output:.5f}) differ from "
            f"the shipped factors' (recomputed {fact.error_weight:.5f}/{fact.error_output:.5f}, "
            f"direct {e_w:.5f}/{e_o:.5f}); the profile cache may be stale: delete it and rerun")


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compress(model, tokenizer, config: RocketConfig, *, cache_dir: str | os.PathLike | None = None,
             data_dir: str | None = None, progress: bool = True) -> CompressionResult:
    """Compress ``model`` in place with ROCKET under ``config`` and return the result."""
    stats: dict[str, StageStats] = {}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    structure = decoder_structure(model, config.targets, config.ignore)
    value_dtype = _value_dtype(model, config)
    with stage("calibration", stats):
        windows, source = calibration_windows(tokenizer, config, data_dir)
        keys = run_keys(model_fingerprint(model, structure), windows, structure, config, value_dtype)
        grams_store = GramStore(cache, keys.calibration, {"source": source, "samples": config.calib_samples,
                                                          "seq_len": config.calib_seq_len, "seed": config.seed})
        run_calibration(model, structure, windows, config, grams_store, progress)
    with stage("profiling", stats):
        store = ProfileStore(cache, keys.profile, {"calibration": keys.calibration, "grid": config.grid})
        profiles = run_profiling(model, structure, grams_store, store, config, value_dtype, progress)
    with stage("allocation", stats):
        allocation = allocate(profiles, config.removed_ratio, config.cost, config.budget_count, config.alpha)
    log.info("allocation: %s cost, removed %.2f%% (target %.2f%%)", config.cost,
             100 * allocation.achieved_removed_ratio, 100 * config.removed_ratio)
    with stage("compression", stats):
        checks = apply_allocation(model, structure, allocation, grams_store, config, value_dtype, progress)
    return CompressionResult(model, tokenizer, config, allocation, profiles, stats, keys,
                             {**checks, "calibration_source": source, "profile_store": str(store.path)})
