"""Who this process is in a multi-process run, and the few collectives the stages use.

A :class:`DistContext` is single-process by default (every collective is the identity), so
the stages take one unconditionally. Under ``torchrun`` :func:`init_from_env` reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` from the environment and starts a
process group whose backend follows the configured device (``gloo`` on CPU, ``nccl`` on CUDA,
torch's own device -> backend map), plus a ``gloo`` control group for Python objects and
status exchanges.

Failure handling: local work runs inside :meth:`DistContext.step`; when it ends, every rank
reports success or its exception to every other (a monitored barrier first, so a rank that
hangs is named after the timeout). A rank that failed re-raises its own exception; the others
raise :class:`DistributedError` naming it. No rank is left waiting in a collective.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from rocketlm.errors import RocketError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "ROCKETLM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


class DistributedError(RocketError, RuntimeError):
    """Another process of a multi-process run failed, hung or vanished; the message names it."""


def env_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the torchrun environment; ``(0, 1)`` outside it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise DistributedError("RANK / WORLD_SIZE in the environment are not integers; "
                               "start multi-process runs with torchrun") from None


def env_rank_tag() -> str:
    """``"rank R/W"`` under a multi-process torchrun launch, else ``""`` (for log formats)."""
    rank, world = env_world()
    return f"rank {rank}/{world}" if world > 1 else ""


def _env_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds") from None


@dataclass
class DistContext:
    """This process's place in the run. The default is one process (no collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this host (each holds its own copy of the model)
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    host: str = field(default_factory=socket.gethostname)
    control: Any = None  # the gloo process group of the object collectives
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    def device(self, device: str | torch.device | None) -> torch.device:
        """The device this rank runs on: an accelerator without an index gets ``LOCAL_RANK``."""
        device = torch.device(device or "cpu")
        if self.distributed and device.type != "cpu" and device.index is None:
            device = torch.device(device.type, self.local_rank)
        return device

    # ------------------------------------------------------------------ status and failures
    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run local work; on exit every rank learns whether every other one succeeded."""
        try:
            yield
        except Exception as exc:
            if self.distributed:
                self.sync(what, exc)
            raise
        else:
            self.sync(what)

    def sync(self, what: str, error: BaseException | None = None, payload: Any = None) -> list:
        """Exchange ``(status, payload)`` with every rank; returns every rank's payload.

        Raises ``error`` on the rank that had one, :class:`DistributedError` naming the failed
        ranks on the others, and :class:`DistributedError` when a rank does not answer in time."""
        if not self.distributed:
            if error is not None:
                raise error
            return [payload]
        status = None if error is None else f"{type(error).__name__}: {error}"
        try:
            torch.distributed.monitored_barrier(group=self.control, timeout=timedelta(seconds=self.timeout_s),
                                                wait_all_ranks=True)
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (self.rank, self.host, status, payload), group=self.control)
        except RuntimeError as exc:  # DistError and gloo's timeouts / closed connections
            if error is not None:
                raise error
            raise self._lost_contact(what, exc) from exc
        if error is not None:
            raise error
        failed = [g for g in gathered if g[2] is not None]
        if failed:
            raise DistributedError("; ".join(f"rank {r} of {self.world_size} (host {h}) failed while {what}: {s}"
                                             for r, h, s, _ in failed))
        return [g[3] for g in gathered]

    def _lost_contact(self, what: str, exc: BaseException) -> DistributedError:
        late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
        wait = f"within {self.timeout_s:g} s (set {TIMEOUT_ENV} to wait longer)"
        if late:
            ranks = ", ".join(late.group(1).replace(",", " ").split())
            return DistributedError(f"rank {ranks} of {self.world_size} did not finish {what} {wait}: hung or stopped; "
                                    "see its log")
        return DistributedError(f"{self.tag}: lost contact with the other processes while {what}: a process stopped "
                                f"or did not answer {wait}; see the other ranks' logs [{str(exc).splitlines()[0]}]")

    # ------------------------------------------------------------------ object collectives
    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (in rank order) on rank 0; ``None`` elsewhere."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, gathered, dst=0, group=self.control)
        return gathered

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks in place (device backend: gloo on CPU, nccl on CUDA)."""
        if not self.distributed:
            return
        for tensor in tensors:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    # ------------------------------------------------------------------ work on rank 0
    def on_main(self, fn: Callable[[], T], what: str, broadcast: bool = True) -> T | None:
        """``fn()`` on rank 0 only; its result on every rank (``broadcast``) or ``None`` elsewhere."""
        result = None
        with self.step(what):
            if self.is_main:
                result = fn()
        return self.broadcast(result) if broadcast else result

    def on_main_first(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on rank 0, then on the other ranks (e.g. a store that creates files when opened)."""
        result = None
        with self.step(what):
            if self.is_main:
                result = fn()
        with self.step(what):
            if not self.is_main:
                result = fn()
        return result

    def is_writer(self, directory: str | os.PathLike) -> bool:
        """Whether this rank writes a shared store under ``directory`` (collective): rank 0, and on a host
        that does not see rank 0's ``directory`` (no shared file system) the lowest rank of that host."""
        if not self.distributed:
            return True
        sees = self.probe_shared(directory)
        blind = [r for r, (host, seen) in enumerate(sees) if host == self.host and not seen]
        return self.is_main or (bool(blind) and blind[0] == self.rank)

    def probe_shared(self, directory: str | os.PathLike) -> list[tuple[str, bool]]:
        """``(host, sees rank 0's directory)`` of every rank (collective): rank 0 writes a probe file in
        ``directory``, every rank looks for it."""
        directory = Path(directory)
        if not self.distributed:
            return [(self.host, True)]
        name = self.on_main(lambda: _touch_probe(directory), "probing the cache directory")
        sees = self.all_gather((self.host, (directory / name).exists()))
        if self.is_main:
            (directory / name).unlink(missing_ok=True)
        return sees

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


SINGLE = DistContext()


def _touch_probe(directory: Path) -> str:
    name = f".probe-{uuid.uuid4().hex}"
    (directory / name).touch()
    return name


def init_from_env(device: str | torch.device | None = "cpu", timeout_s: float | None = None) -> DistContext:
    """The process group torchrun describes in the environment, or :data:`SINGLE` outside torchrun.

    The backend follows ``device`` (torch's default backend of that device type: gloo for CPU,
    nccl for CUDA); ``timeout_s`` bounds every wait for another rank [$ROCKETLM_DIST_TIMEOUT or 1800]."""
    rank, world = env_world()
    if world <= 1:
        return SINGLE
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    timeout_s = _env_timeout() if timeout_s is None else timeout_s
    ctx = DistContext(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), timeout_s=timeout_s)
    device = ctx.device(device)
    ctx.backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)
    if not dist.is_initialized():
        dist.init_process_group(backend=ctx.backend, timeout=timedelta(seconds=timeout_s))
        ctx.owns_group = True
    ctx.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    log.info("%s on %s: process group up (backend %s, device %s, timeout %g s)",
             ctx.tag, ctx.host, ctx.backend, device, timeout_s)
    return ctx
