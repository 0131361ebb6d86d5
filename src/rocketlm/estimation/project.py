"""From timed kernels to stage times and peak memory, for one process or ``nproc`` of them.

* calibration is data-parallel: every process forwards a contiguous run of whole batches (as
  ``rocketlm.distributed`` shares them), then per block the float64 Grams are summed over the
  processes (a ring ``all_reduce``: ``2 (N - 1) / N`` x the block's Gram bytes over the link) and
  one process writes them;
* profiling and compression are layer-parallel: layers are packed onto processes by the
  longest-processing-time rule on their projected times; a process whitens each Gram group
  and reads each block's Grams that its layers need;
* the fisher cost's sensitivities are data-parallel like calibration; the knapsack runs on one process.

Memory is a model of what is resident at the peak (weights, calibration hidden states, Grams,
per-layer work arrays), listed per part, plus the resident size of a Python process with torch
and transformers imported.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from rocketlm.calibration.sequential import DENSE_INPUTS_BYTES
from rocketlm.calibration.sensitivity import HEAD_LOGIT_BYTES
from rocketlm.errors import ConfigError
from rocketlm.estimation.describe import ModelDescription
from rocketlm.estimation.probe_allocation import AllocationProbe, DiskProbe
from rocketlm.estimation.probe_calibration import CalibrationProbe
from rocketlm.estimation.probe_layers import LayerProbe


@dataclass(frozen=True)
class Component:
    """A part of a stage's time; ``dtype`` is the dtype whose GEMM rate bounds it (None: not
    compute bound: disk, network, Python)."""

    name: str
    seconds: float
    dtype: str | None


@dataclass(frozen=True)
class StageEstimate:
    name: str
    seconds: float  # wall time: the slowest process
    peak_bytes: int  # peak resident bytes of one process
    components: tuple[Component, ...]  # the slowest process's time, by part
    memory: dict[str, int] = field(default_factory=dict)  # the peak, by part
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunShape:
    """The run's sizes and the environment the projection assumes."""

    samples: int
    seq_len: int
    batch_size: int
    nproc: int = 1
    link_bytes_per_s: float = 10e9  # all_reduce bandwidth between processes
    baseline_bytes: int = 0  # resident size of the process before any model is loaded
    tokens: int = 0  # calibration tokens (samples x seq_len)
    threads: int = 1  # intra-op threads of each process
    sequential_windows: int = 0  # windows of the sequential pass (RocketConfig.sequential_windows)


def rank_batches(samples: int, batch_size: int, rank: int, nproc: int) -> list[int]:
    """Batch sizes (windows) forwarded by ``rank``: a contiguous run of whole batches."""
    n_batches = math.ceil(samples / batch_size)
    if n_batches < nproc:
        raise ConfigError(f"calibration: {samples} windows make {n_batches} batches of {batch_size}, fewer than "
                          f"the {nproc} processes; lower the batch size or the number of processes")
    first, last = rank * n_batches // nproc, (rank + 1) * n_batches // nproc
    return [min(batch_size, samples - i * batch_size) for i in range(first, last)]


def lpt_pack(costs: dict[str, float], bins: int) -> list[list[str]]:
    """Longest-processing-time greedy: names by decreasing cost, each to the least loaded bin."""
    loads = [0.0] * bins
    parts: list[list[str]] = [[] for _ in range(bins)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        target = min(range(bins), key=lambda b: (loads[b], b))
        loads[target] += costs[name]
        parts[target].append(name)
    return parts


class CalibrationModel:
    """Seconds of the calibration kernels for any batch, from one :class:`CalibrationProbe`."""

    def __init__(self, description: ModelDescription, probe: CalibrationProbe, seq_len: int):
        self.d, self.p, self.seq_len = description, probe, seq_len
        # the attention scores grow with the window: a probe on shorter windows is corrected by the
        # ratio of per-token multiply-adds, 2 P (linears) + 4 L A (scores and their product with V)
        P, A = description.block_params, description.attention_width
        self.attention = (2 * P + 4 * seq_len * A) / (2 * P + 4 * probe.seq_len * A)
        self.width: dict[int, int] = defaultdict(int)  # per block, sum of d_in^2 over its Gram groups
        for block, d_in in description.groups().values():
            self.width[block] += d_in * d_in

    def _tokens(self, windows: int) -> float:
        return windows * self.seq_len / self.p.tokens

    def forward(self, windows: int) -> float:
        return self.p.forward_s * self._tokens(windows) * self.attention

    def grams(self, windows: int, block: int) -> float:
        """The Gram update's extra time for one batch of ``block`` (its groups' share of the probe's)."""
        extra = max(0.0, self.p.grams_s - self.p.forward_s)
        return extra * self._tokens(windows) * self.width[block] / max(1, self.p.probe_gram_flops)

    def head(self, windows: int) -> float:
        return self.p.head_s * self._tokens(windows)

    def sequential(self, windows: int) -> float:
        """One batch through one block of the sequential calibration pass (0 when it was not probed)."""
        return (self.p.sequential_s or 0.0) * self._tokens(windows) * self.attention

    def sequential_block(self) -> float:
        """What the sequential pass pays once per block (its copy, the forward that orders its groups)."""
        return self.p.sequential_block_s


def _calibration_rank(model: CalibrationModel, run: RunShape, rank: int, disk: DiskProbe) -> list[Component]:
    d = model.d
    batches = rank_batches(run.samples, run.batch_size, rank, run.nproc)
    shapes = set(batches)
    capture = sum((d.n_blocks - 1) * model.forward(w) for w in shapes)  # stopped as the last block is entered
    forward = d.n_blocks * sum(model.forward(w) for w in batches)
    grams = sum(model.grams(w, b) for b in range(d.n_blocks) for w in batches)
    gram_bytes = sum(d.block_gram_bytes(b) for b in range(d.n_blocks))
    parts = [Component("keyword capture (a forward per batch shape, up to the last block)", capture, d.dtype),
             Component("block forwards", forward, d.dtype),
             Component(f"Gram accumulation ({model.p.gram_dtype} GEMMs)", grams, model.p.gram_dtype)]
    if run.nproc > 1:
        ring = 2.0 * (run.nproc - 1) / run.nproc
        parts.append(Component("all_reduce of the Grams", ring * gram_bytes / run.link_bytes_per_s, None))
    if rank == 0:
        parts.append(Component("Gram cache writes", gram_bytes / disk.write_bytes_per_s, None))
    return parts


def calibration_memory(d: ModelDescription, run: RunShape) -> dict[str, int]:
    """The calibration peak of the process with the most windows, by part."""
    windows = max(sum(rank_batches(run.samples, run.batch_size, r, run.nproc)) for r in range(run.nproc))
    tokens = min(run.batch_size, run.samples) * run.seq_len
    size = d.dtype_bytes
    activations = tokens * (d.block_outputs * size + 4 * d.hidden_size * size + 9 * d.max_input)
    hidden = windows * run.seq_len * d.hidden_size * size
    grams = max(map(d.block_gram_bytes, range(d.n_blocks)))
    memory = {"process": run.baseline_bytes, "weights": d.n_params * size, "batch activations": activations}
    return {**memory, "hidden states": hidden, "one block's Grams": grams}


def project_calibration(d: ModelDescription, probe: CalibrationProbe, run: RunShape, disk: DiskProbe,
                        prelude: tuple[Component, ...] = ()) -> StageEstimate:
    """``prelude``: what every process does first (reading the data, the weights' checksum)."""
    model = CalibrationModel(d, probe, run.seq_len)
    ranks = [[*prelude, *_calibration_rank(model, run, r, disk)] for r in range(run.nproc)]
    slowest = max(ranks, key=lambda parts: sum(c.seconds for c in parts))
    memory = calibration_memory(d, run)
    notes = [f"timed on a {probe.batch}x{probe.seq_len} probe batch"]
    if probe.seq_len < run.seq_len:
        notes.append(f"attention corrected for {run.seq_len}-token windows (x{model.attention:.3f})")
    return StageEstimate("calibration", sum(c.seconds for c in slowest), sum(memory.values()), tuple(slowest),
                         memory, tuple(notes))


def _sum_parts(parts: list[list[Component]]) -> list[Component]:
    """Add up components of the same name (in first-seen order)."""
    totals: dict[str, Component] = {}
    for part in parts:
        for c in part:
            old = totals.get(c.name)
            totals[c.name] = Component(c.name, c.seconds + (old.seconds if old else 0.0), c.dtype)
    return list(totals.values())


def layer_parallel(d: ModelDescription, layer_parts: dict[str, list[Component]], whiten: dict[int, float],
                   disk: DiskProbe, nproc: int) -> list[Component]:
    """The slowest process's time when the layers are packed onto ``nproc`` processes; each process
    whitens the Gram groups and reads the blocks its layers need."""
    by_name = {layer.name: layer for layer in d.layers}
    costs = {name: sum(c.seconds for c in parts) + whiten[by_name[name].d_in] for name, parts in layer_parts.items()}
    slowest: list[Component] = []
    for share in lpt_pack(costs, nproc):
        layers = [by_name[name] for name in share]
        groups = {layer.group: layer.d_in for layer in layers}
        blocks = {layer.block for layer in layers}
        parts = _sum_parts([layer_parts[name] for name in share])
        parts.insert(0, Component("whitening (float64 Cholesky)", sum(whiten[w] for w in groups.values()), "float64"))
        reads = sum(d.block_gram_bytes(b) for b in blocks) / disk.read_bytes_per_s
        parts.append(Component("Gram cache reads", reads, None))
        if sum(c.seconds for c in parts) >= sum(c.seconds for c in slowest):
            slowest = parts
    return slowest


def layer_work_bytes(d_in: int, d_out: int) -> int:
    """Arrays alive while one layer is profiled: ``W`` and ``M = S W`` in float64, the Gram of ``M``
    and its eigenvectors, ``B``, ``S^-1 Q``, ``H``, their float32 copies and the importance order."""
    r = min(d_in, d_out)
    return 8 * (3 * d_in * d_out + 4 * r * r + 2 * r * d_out + d_in * r) + 24 * d_out * r


def _layer_memory(d: ModelDescription, run: RunShape, work: int, profile_bytes: int) -> dict[str, int]:
    grams = max(map(d.block_gram_bytes, range(d.n_blocks)))
    return {"process": run.baseline_bytes, "weights": d.n_params * d.dtype_bytes,
            "two blocks' Grams or Grams + whitening factors": 2 * grams, "one layer's work": max(work, grams),
            "profiles": profile_bytes}


def layer_seconds(d: ModelDescription, probes: dict[tuple[int, int], LayerProbe]) -> dict[str, dict]:
    """Per target layer: its Gram group and projected profiling and compression seconds (its group's
    whitening and the Gram reads excluded)."""
    times = {}
    for layer in d.layers:
        probe = probes[(layer.d_in, layer.d_out)]
        times[layer.name] = {"group": layer.group, "profiling_s": probe.profile_s,
                             "compression_s": probe.basis_s + probe.compress_s}
    return times


def project_profiling(d: ModelDescription, probes: dict[tuple[int, int], LayerProbe], whiten: dict[int, float],
                      run: RunShape, disk: DiskProbe, profile_dtype: str, profile_bytes: int,
                      workers: int = 1) -> StageEstimate:
    """``workers`` layers at once per process (``probes`` timed on each worker's share of the threads): the
    layers are packed onto ``nproc x workers`` bins, and each worker holds one layer's work."""
    parts = {}
    for layer in d.layers:
        probe = probes[(layer.d_in, layer.d_out)]
        parts[layer.name] = [Component("whitened basis (float64)", probe.basis_s, "float64"),
                             Component("candidates", max(0.0, probe.profile_s - probe.basis_s), profile_dtype)]
    slowest = layer_parallel(d, parts, whiten, disk, run.nproc * workers)
    work = workers * max(layer_work_bytes(layer.d_in, layer.d_out) for layer in d.layers)
    memory = _layer_memory(d, run, work, profile_bytes)
    count = sum(p.candidates for p in probes.values())
    notes = (f"profile_layer timed as it runs (candidates it evaluated on the probes: {count})",)
    if workers > 1:
        notes += (f"{workers} layers at once per process, each timed on {max(1, run.threads // workers)} of its "
                  f"{run.threads} threads",)
    return StageEstimate("profiling", sum(c.seconds for c in slowest), sum(memory.values()), tuple(slowest),
                         memory, notes)


def sequential_components(d: ModelDescription, model: CalibrationModel, run: RunShape,
                          cross: bool) -> list[Component]:
    """``--sequential``: every batch of its windows (the first ``run.sequential_windows``) through every block
    again, stopping at each Gram group's input (with ``cross``, beside the dense model's stream and its
    cross-Grams), in one process."""
    batches = rank_batches(run.sequential_windows, run.batch_size, 0, 1)
    seconds = d.n_blocks * (model.sequential_block() + sum(model.sequential(w) for w in batches))
    name = "sequential calibration (forwards to each group's input, Grams" + (
        ", dense stream and cross-Grams)" if cross else ")")
    return [Component(name, seconds, d.dtype)]


def sequential_memory(d: ModelDescription, run: RunShape, cross: bool) -> dict[str, int]:
    """What the sequential pass holds beside the compression stage's work: the hidden states of every window
    entering the current block (two streams with ``cross``), one group's Gram and cross-Gram, and with ``cross``
    a copy of the current block and the most dense inputs it can keep for one block (see
    :meth:`ModelDescription.kept_dense_inputs_bytes`)."""
    tokens = run.sequential_windows * run.seq_len
    hidden = tokens * d.hidden_size * d.dtype_bytes
    widest = max(d_in for _, d_in in d.groups().values())
    memory = {"sequential hidden states": hidden * (2 if cross else 1),
              "sequential Grams": 8 * widest * widest * (2 if cross else 1)}
    if cross:
        memory["dense block copy"] = d.block_params * d.dtype_bytes
        memory["dense inputs of one block"] = d.kept_dense_inputs_bytes(tokens, DENSE_INPUTS_BYTES)
    return memory


def project_compression(d: ModelDescription, probes: dict[tuple[int, int], LayerProbe], whiten: dict[int, float],
                        run: RunShape, disk: DiskProbe, removed_ratio: float, value_bytes: int,
                        allocation: AllocationProbe, sequential: CalibrationModel | None = None,
                        cross: bool = False, max_removed: float = 1.0) -> StageEstimate:
    """The layers the synthetic allocation compresses are factored. The real allocation's count depends on the
    real errors (on SmolLM2-135M's own profiles, 50 to 192 of its 210 layers at 10-60% removed, by cost and
    budget count), so the notes also give the stage's layer time at the fewest layers that can reach the
    budget (:func:`fewest_compressed`, the largest at ``max_removed``, the grid's largest removed ratio) and
    at every layer, the bounds of the real count.
    ``sequential`` (a calibration model whose probe timed the sequential pass): the run's ``--sequential``
    pass (``cross``: with ``--upstream-correction``), one process, before the layers' factorizations."""
    parts = {}
    for layer in d.layers:
        if layer.name in allocation.compressed:
            probe = probes[(layer.d_in, layer.d_out)]
            parts[layer.name] = [Component("whitened basis (float64)", probe.basis_s, "float64"),
                                 Component("factors, module and direct check", probe.compress_s, "float64")]
    nproc = 1 if sequential is not None else run.nproc  # the sequential pass and its layers: one process
    slowest = layer_parallel(d, parts, whiten, disk, nproc)
    work = max(layer_work_bytes(layer.d_in, layer.d_out) + 32 * layer.d_in * layer.d_out for layer in d.layers)
    memory = _layer_memory(d, run, work, allocation.profile_bytes)
    memory["compressed modules"] = int((1.0 - removed_ratio) * sum(x.d_in * x.d_out for x in d.layers) * value_bytes)
    every_part = _every_layer(d, probes)
    every = sum(c.seconds for c in layer_parallel(d, every_part, whiten, disk, nproc))
    fewest = fewest_compressed(d, removed_ratio, max_removed)
    least = sum(c.seconds for c in layer_parallel(d, {n: every_part[n] for n in fewest}, whiten, disk, nproc))
    notes = (f"{len(parts)} of {len(d.layers)} layers compressed, as the allocation of synthetic profiles chose; "
             f"the real count depends on the real errors: the fewest that reach the budget ({len(fewest)}): "
             f"{least:.3g} s, all {len(d.layers)}: {every:.3g} s",)
    if sequential is not None:
        slowest = sequential_components(d, sequential, run, cross) + slowest
        memory.update(sequential_memory(d, run, cross))
        notes += (f"sequential pass on {run.sequential_windows} windows, timed on the probe block with every Gram "
                  "group staged, in one process",)
    return StageEstimate("compression", sum(c.seconds for c in slowest), sum(memory.values()), tuple(slowest),
                         memory, notes)


def fewest_compressed(d: ModelDescription, removed_ratio: float, max_removed: float) -> list[str]:
    """The fewest layers whose compression can remove ``removed_ratio`` of the targeted values: the largest,
    each at ``max_removed`` (all of them when even that falls short)."""
    total = sum(layer.d_in * layer.d_out for layer in d.layers)
    chosen, removed = [], 0.0
    for layer in sorted(d.layers, key=lambda x: x.d_in * x.d_out, reverse=True):
        if removed >= removed_ratio * total:
            break
        chosen.append(layer.name)
        removed += max_removed * layer.d_in * layer.d_out
    return chosen


def _every_layer(d: ModelDescription, probes: dict[tuple[int, int], LayerProbe]) -> dict:
    return {layer.name: [Component("layer", probes[(layer.d_in, layer.d_out)].basis_s
                                   + probes[(layer.d_in, layer.d_out)].compress_s, None)] for layer in d.layers}


def sensitivity_components(d: ModelDescription, model: CalibrationModel, windows: int) -> list[Component]:
    """The ``fisher`` cost's sensitivities on ``windows`` windows, one at a time
    (:func:`rocketlm.calibration.sensitivity.measure_sensitivities`): a forward without gradients, then per
    block a forward with gradients and its backward (about twice a forward), and the head forward and backward
    (three vocabulary-wide products) per window."""
    blocks = d.n_blocks * model.forward(1) * windows
    return [Component("sensitivity: block forwards, then forward + backward per block", 4.0 * blocks, d.dtype),
            Component("sensitivity: head forward + backward", 3.0 * model.head(1) * windows, d.dtype)]


def sensitivity_memory(d: ModelDescription, run: RunShape, windows: int) -> dict[str, int]:
    """Every block's input of the sensitivity windows (in memory; spilled to disk when offloaded) and one
    chunk of the head's logits (at most ``HEAD_LOGIT_BYTES``, positions of one window) with their gradient."""
    logits = min(run.seq_len * d.vocab_size * 4, HEAD_LOGIT_BYTES)
    return {"sensitivity block inputs": d.n_blocks * windows * run.seq_len * d.hidden_size * d.dtype_bytes,
            "sensitivity logits and gradient": 3 * logits}


def project_allocation(d: ModelDescription, probe: AllocationProbe, run: RunShape,
                       calibration: CalibrationProbe | None = None, sensitivity_windows: int = 0) -> StageEstimate:
    """The knapsack (rank 0), and with ``sensitivity_windows`` (the ``fisher`` cost) the sensitivities it needs,
    timed from the ``calibration`` probe; they are data-parallel: the slowest process measures
    ``ceil(windows / nproc)`` windows (the reduced sums are a few numbers per layer)."""
    memory = {"process": run.baseline_bytes, "weights": d.n_params * d.dtype_bytes, "profiles": probe.profile_bytes}
    parts = [Component("knapsack (allocate)", probe.seconds, None)]
    notes = [f"allocate() on synthetic profiles: {len(d.layers)} layers, {probe.candidates} candidates"]
    if sensitivity_windows and calibration is not None:
        share = math.ceil(sensitivity_windows / run.nproc)
        parts = sensitivity_components(d, CalibrationModel(d, calibration, run.seq_len), share) + parts
        memory.update(sensitivity_memory(d, run, share))
        notes.append(f"layer sensitivities on {sensitivity_windows} windows of {run.seq_len} tokens"
                     + (f" ({share} per process)" if run.nproc > 1 else ""))
    return StageEstimate("allocation", sum(c.seconds for c in parts), sum(memory.values()), tuple(parts), memory,
                         tuple(notes))
