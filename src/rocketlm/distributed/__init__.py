"""Multi-process compression with ``torch.distributed`` (``torchrun ... -m rocketlm compress``).

* calibration is data-parallel: each rank forwards its share of the windows; the float64 Grams
  and token counts are summed with ``all_reduce`` and rank 0 writes the Gram cache;
* profiling is layer-parallel: layers are bin-packed onto ranks by estimated cost, each rank
  appends its profiles to its own shard of the profile store, rank 0 gathers them;
* the ``fisher`` cost's sensitivities are data-parallel too (per-layer sums ``all_reduce``d);
  the knapsack runs on rank 0 and its allocation is broadcast; compression is layer-parallel and rank 0
  receives every compressed module and writes the checkpoint.

Without torchrun (``WORLD_SIZE`` unset or 1) :func:`init_from_env` returns :data:`SINGLE` and
nothing changes. See :mod:`rocketlm.distributed.context` for failure handling.
"""
from rocketlm.distributed.context import (DEFAULT_TIMEOUT_S, SINGLE, TIMEOUT_ENV, DistContext, DistributedError,
                                          env_rank_tag, init_from_env)

__all__ = ["DEFAULT_TIMEOUT_S", "SINGLE", "TIMEOUT_ENV", "DistContext", "DistributedError", "env_rank_tag",
           "init_from_env"]
