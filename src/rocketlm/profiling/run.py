"""The profiling stage: every target layer's candidates, appended to a resumable :class:`ProfileStore`."""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from rocketlm.calibration.store import GramStore
from rocketlm.config import RocketConfig
from rocketlm.factorization.whitening import weight_matrix, whitened_layers
from rocketlm.models.discovery import DecoderStructure
from rocketlm.profiling.profile import LayerProfile, profile_layer, run_ks_search
from rocketlm.profiling.store import ProfileStore


def run_profiling(model, structure: DecoderStructure, grams_store: GramStore, store: ProfileStore,
                  config: RocketConfig, value_dtype: torch.dtype, progress: bool = True, dist=None,
                  layers: Collection[str] | None = None, desc: str = "profiling (layers)",
                  workers: int | None = None) -> list[LayerProfile]:
    """Profile every target layer (or every one in ``layers``) not yet in ``store``; returns their
    profiles in model order.

    ``dist``: a :class:`rocketlm.distributed.DistContext`; with several processes the layers are shared
    out and rank 0 returns every profile, the others ``[]`` (``rocketlm.distributed.profiling``).
    ``workers``: layers profiled at once in this process (default: :func:`profile_workers` of the config's
    ``profile_workers``)."""
    if dist is not None and dist.distributed:
        from rocketlm.distributed.profiling import profile_parallel
        return profile_parallel(model, structure, grams_store, store, config, value_dtype, progress, dist)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    dtype = getattr(torch, config.profile_dtype)
    value_bytes = torch.tensor([], dtype=value_dtype).element_size()
    wanted = set(structure.all_targets if layers is None else layers)
    names = [name for name in structure.all_targets if name in wanted]
    todo = [name for name in names if name not in store]
    workers = profile_workers(config.profile_workers, device) if workers is None else workers
    ks_search, search_costs = run_ks_search(config)

    def profile_one(name: str, S: torch.Tensor, group: str) -> LayerProfile:
        start = time.perf_counter()
        profile = profile_layer(name, weight_matrix(modules[name]), S, config.grid, group=group,
                                value_bytes=value_bytes, ridge_rel=config.ridge_rel,
                                importance_power=config.importance_power, dtype=dtype, ks_search=ks_search,
                                search_costs=search_costs)
        profile.seconds = time.perf_counter() - start
        return profile

    layers_in = whitened_layers(structure, grams_store, lambda n: n in wanted and n not in store,
                                config.whitening_eps, device)
    with tqdm(total=len(names), initial=len(names) - len(todo), desc=desc, disable=not progress) as bar:
        for profile in concurrent_map(profile_one, layers_in, workers):
            store.put(profile)  # from this thread only: the store has one writer
            bar.update(1)
    return [store.layers[name] for name in names]


def profile_workers(requested: int, device: torch.device) -> int:
    """Layers profiled at once in this process: ``requested`` if > 0, else 2 on a CPU with at least 2 intra-op
    threads and 1 elsewhere. A layer's candidates are many small kernels (k x k Cholesky factors, sparse
    updates) that keep one thread busy far better than two: on SmolLM2-135M (2 cores, reference grid) two
    layers at a time on one thread each profile in 0.78x the time of one layer on two threads. Each worker holds
    one layer's working set, so offloaded runs keep 1 (memory first)."""
    if requested > 0:
        return requested
    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def per_worker_threads(workers: int, total: int) -> int:
    """Intra-op threads of each of ``workers`` concurrent layers sharing ``total``."""
    return max(1, total // workers)


@contextmanager
def threads_per_worker(workers: int) -> Iterator[None]:
    """Share this process's intra-op threads among ``workers`` concurrent layers for the duration."""
    total = torch.get_num_threads()
    torch.set_num_threads(per_worker_threads(workers, total))
    try:
        yield
    finally:
        torch.set_num_threads(total)


def concurrent_map(fn: Callable, items: Iterable[tuple], workers: int) -> Iterator:
    """``fn(*item)`` for every item, up to ``workers`` at a time on threads (torch releases the GIL in its
    kernels), yielded as they finish. Items are drawn lazily, at most ``workers`` in flight, so the producer
    (the whitening of the next Gram group) stays at most one layer ahead. With ``workers <= 1``: a plain loop.
    An error in one call cancels what has not started and is raised here."""
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    # each worker sets its own thread count before its first kernel. Without it the first layer a fresh worker
    # thread took could round differently in the last bit from the same layer profiled again (MKL, 2 workers:
    # 9 of 60 resumed runs changed an error by 1 ulp; 0 of 116 with it): a resumed run must reproduce the
    # profiles of an uninterrupted one exactly (tests/distributed/test_dist_units.py)
    per = per_worker_threads(workers, torch.get_num_threads())
    with threads_per_worker(workers), ThreadPoolExecutor(workers, thread_name_prefix="rocketlm-profile",
                                                         initializer=torch.set_num_threads, initargs=(per,)) as pool:
        pending: set[Future] = set()
        try:
            for item in items:
                pending.add(pool.submit(fn, *item))
                if len(pending) >= workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            for future in list(pending):
                yield future.result()
                pending.discard(future)
        finally:
            for future in pending:
                future.cancel()
