"""``estimate``: how long and how much memory a compression run will take, before running it.

Reads only the model's config, times the stages' kernels on this device with the real layer
shapes (:mod:`~rocketlm.estimation.probe_calibration`, :mod:`~rocketlm.estimation.probe_layers`,
:mod:`~rocketlm.estimation.probe_allocation`) and projects them onto the run's sizes
(:mod:`~rocketlm.estimation.project`). :func:`project_to_device` rescales a result to another
device by the ratio of GEMM rates, component by component.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from rocketlm.config import RocketConfig
from rocketlm.estimation.describe import ModelDescription, describe_model, read_config
from rocketlm.estimation.probe_allocation import probe_allocation, probe_disk
from rocketlm.estimation.probe_calibration import probe_calibration, probe_data, probe_fingerprint
from rocketlm.estimation.probe_layers import LayerProbe, LayerSettings, probe_layer, probe_whitening
from rocketlm.estimation.project import (CalibrationModel, Component, RunShape, StageEstimate, layer_seconds,
                                         project_allocation, project_calibration, project_compression,
                                         project_profiling)
from rocketlm.estimation.timing import gemm_rate, process_baseline, using_clock
from rocketlm.compression.sequential import decide_sequential
from rocketlm.preflight import check_processes
from rocketlm.profiling.profile import run_ks_search
from rocketlm.profiling.run import profile_workers, threads_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimateOptions:
    """How the estimate probes and what it assumes (the run itself is a :class:`RocketConfig`)."""

    nproc: int = 1  # processes: calibration data-parallel, profiling and compression layer-parallel
    dtype: str | None = None  # the dtype the model would be loaded in (default: its config's)
    cache_dir: str | None = None  # where the Gram cache would live (its disk is timed)
    data_dir: str | None = None  # the calibration data (default $ROCKETLM_DATA); not timed when absent
    max_probe_dim: int = 4096  # wider layers are timed scaled down (times x f^3)
    probe_seconds: float = 30.0  # a layer shape's profile_layer probe grows from 512 wide while under this
    max_probe_tokens: int = 4096  # calibration probe batch size in tokens at most
    link_gbps: float = 10.0  # all_reduce bandwidth between processes, GB/s
    repeats: int = 3
    clock: str = "wall"  # "cpu": probes timed in CPU seconds (load-independent with one thread)


@dataclass
class CostEstimate:
    """Projected time and peak memory of every stage of one run."""

    model: str
    device: str
    threads: int
    nproc: int
    config: dict
    model_summary: dict
    stages: list[StageEstimate]
    layer_probes: list[dict] = field(default_factory=list)  # per distinct shape, scaled to it
    layers: dict[str, dict] = field(default_factory=dict)  # per layer: group, profiling_s, compression_s
    whitening_seconds: dict[str, float] = field(default_factory=dict)  # per Gram group
    gemm_gflops: dict[str, float] = field(default_factory=dict)
    disk: dict = field(default_factory=dict)
    gram_cache_bytes: int = 0
    estimate_seconds: float = 0.0
    load_average: tuple[float, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.name == name)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(total_seconds=self.total_seconds, peak_bytes=self.peak_bytes)
        return data


def _summary(d: ModelDescription) -> dict:
    return {"model_type": d.model_type, "dtype": d.dtype, "parameters": d.n_params, "blocks": d.n_blocks,
            "target_layers": len(d.layers), "gram_groups": len(d.groups()), "hidden_size": d.hidden_size,
            "vocab_size": d.vocab_size, "shapes": [list(s) for s in d.shapes()]}


def _value_dtype(config: RocketConfig, d: ModelDescription) -> str:
    return config.save_dtype or d.dtype


def _probe_layers(d: ModelDescription, config: RocketConfig, options: EstimateOptions, concurrent: int = 1
                  ) -> tuple[dict[tuple[int, int], LayerProbe], dict[int, float]]:
    settings = LayerSettings(config.grid, config.removed_ratio, config.ridge_rel, config.importance_power,
                             config.profile_dtype, _value_dtype(config, d),
                             *run_ks_search(config), config.refine_iters, concurrent)
    probes = {shape: probe_layer(*shape, settings, options.max_probe_dim, options.probe_seconds,
                                 repeats=options.repeats, device=config.device)
              for shape in d.shapes()}
    tokens = config.calib_samples * config.calib_seq_len
    widths = sorted({d_in for _, d_in in d.groups().values()})
    whiten = {w: probe_whitening(w, tokens, options.max_probe_dim, options.repeats, config.device) for w in widths}
    return probes, whiten


def _profile_workers(config: RocketConfig) -> int:
    """Layers profiled at once per process, as the run would choose (offloaded runs: 1 unless set)."""
    if config.offload == "disk":
        return config.profile_workers or 1
    return profile_workers(config.profile_workers, torch.device(config.device))


def _sensitivity_windows(config: RocketConfig) -> int:
    from rocketlm.allocation.costs import needs_sensitivity
    return min(config.sensitivity_samples, config.calib_samples) if needs_sensitivity(config.cost) else 0


def _run_shape(config: RocketConfig, options: EstimateOptions, baseline: int) -> RunShape:
    return RunShape(samples=config.calib_samples, seq_len=config.calib_seq_len, batch_size=config.calib_batch_size,
                    nproc=options.nproc, link_bytes_per_s=options.link_gbps * 1e9, baseline_bytes=baseline,
                    tokens=config.calib_samples * config.calib_seq_len, threads=torch.get_num_threads(),
                    sequential_windows=config.sequential_windows)


def estimate(model: str, config: RocketConfig, options: EstimateOptions = EstimateOptions()) -> CostEstimate:
    """Project the time and peak memory of ``rocketlm compress MODEL`` under ``config`` on this device
    (``config.device``), with ``options.nproc`` processes each on a device like this one."""
    with using_clock(options.clock):
        return _estimate(model, config, options)


def _estimate(model: str, config: RocketConfig, options: EstimateOptions) -> CostEstimate:
    check_processes(config, options.nproc)  # before any probe: options the run itself would refuse
    config = decide_sequential(config, options.nproc, offloaded=config.offload == "disk")  # as the run decides
    start, load = time.perf_counter(), _load_average()
    baseline = process_baseline()
    hf_config = read_config(model)
    d, probe = describe_model(model, hf_config, config.targets, config.ignore, options.dtype, config.device)
    run = _run_shape(config, options, baseline)
    calibration = probe_calibration(probe, d, min(config.calib_batch_size, config.calib_samples),
                                    config.calib_seq_len, options.max_probe_tokens, options.repeats,
                                    sequential=config.sequential, cross=config.sequential and config.upstream_correction,
                                    calib_tokens=config.sequential_windows * config.calib_seq_len)
    prelude, run = _prelude(model, config, options, probe, d, run)
    del probe
    layer_probes, whiten = _probe_layers(d, config, options)
    workers = _profile_workers(config)
    if workers > 1:  # profiling runs several layers at once, each on its share of the threads: time it so
        with threads_per_worker(workers):
            profile_probes, profile_whiten = _probe_layers(d, config, options, concurrent=workers)
    else:
        profile_probes, profile_whiten = layer_probes, whiten
    value_bytes = torch.empty((), dtype=getattr(torch, _value_dtype(config, d))).element_size()
    allocation = probe_allocation(d, config.grid, config.removed_ratio, config.cost, config.budget_count,
                                  config.alpha, value_bytes, options.repeats)
    disk = probe_disk(options.cache_dir, max(map(d.block_gram_bytes, range(d.n_blocks))))
    stages = [project_calibration(d, calibration, run, disk, prelude),
              project_profiling(d, profile_probes, profile_whiten, run, disk, config.profile_dtype,
                                allocation.profile_bytes, workers),
              project_allocation(d, allocation, run, calibration, _sensitivity_windows(config)),
              project_compression(d, layer_probes, whiten, run, disk, config.removed_ratio, value_bytes,
                                  allocation, CalibrationModel(d, calibration, run.seq_len) if config.sequential
                                  else None, config.upstream_correction, max(config.grid.removed_ratios))]
    dtypes = {d.dtype, "float64", config.profile_dtype, calibration.gram_dtype}
    rates = {dt: gemm_rate(dt, config.device).gflops for dt in dtypes}
    return CostEstimate(
        model=model, device=_device_name(config.device), threads=torch.get_num_threads(), nproc=options.nproc,
        config=config.to_dict(), model_summary=_summary(d), stages=stages,
        layer_probes=[{**dataclasses.asdict(p), "whitening_s": whiten.get(p.d_in)} for p in layer_probes.values()],
        layers=layer_seconds(d, layer_probes),
        whitening_seconds={group: whiten[d_in] for group, (_, d_in) in d.groups().items()},
        gemm_gflops=rates, disk=dataclasses.asdict(disk),
        gram_cache_bytes=sum(map(d.block_gram_bytes, range(d.n_blocks))),
        estimate_seconds=time.perf_counter() - start, load_average=load + _load_average(),
        notes=_notes(options, any(c.name.startswith("calibration data") for c in prelude)) + _unmodelled(config))


def _prelude(model: str, config: RocketConfig, options: EstimateOptions, probe, d: ModelDescription,
             run: RunShape) -> tuple[tuple[Component, ...], RunShape]:
    """The calibration stage's first steps, and the run with the data's resident size in its baseline."""
    parts = [Component("weight checksum (cache key)", probe_fingerprint(probe, d, options.repeats), None)]
    data = probe_data(model, config, options.data_dir)
    if data is None:
        return tuple(parts), run
    parts.insert(0, Component("calibration data (read, tokenize)", data.seconds, None))
    return tuple(parts), dataclasses.replace(run, baseline_bytes=run.baseline_bytes + data.rss_bytes)


def _notes(options: EstimateOptions, data_timed: bool) -> list[str]:
    notes = [f"layer shapes timed at most {options.max_probe_dim} wide, grown from 512 while profile_layer stays under "
             f"{options.probe_seconds:g} s; times x f^3 to the real shape"]
    if options.clock != "wall":
        notes.append(f"probes timed in {options.clock} seconds")
    if not data_timed:
        notes.append("reading the calibration data not timed (no tokenizer or data files at hand)")
    if options.nproc > 1:
        notes.append(f"{options.nproc} processes, each on a device like this one; all_reduce at "
                     f"{options.link_gbps:g} GB/s")
    return notes


# Options of a run whose cost the estimate does not model (offloading).
UNMODELLED = ("offload",)


def _unmodelled(config: RocketConfig) -> list[str]:
    default = RocketConfig()
    changed = [f"{name}={getattr(config, name)!r}" for name in UNMODELLED
               if hasattr(config, name) and getattr(config, name) != getattr(default, name)]
    return [f"not modelled: {', '.join(changed)} (their extra time and memory are not included)"] if changed else []


def _load_average() -> tuple[float, ...]:
    try:
        return (round(os.getloadavg()[0], 2),)
    except OSError:
        return ()


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class TargetDevice:
    """Another device, by its peak GEMM rates (TFLOP/s per dtype) and the share of peak it reaches."""

    name: str
    tflops: dict[str, float]
    efficiency: float = 0.5


# Dense peaks from NVIDIA's H100 SXM data sheet: FP64 tensor core 67, FP32 67, BF16/FP16 tensor core 989.
H100 = TargetDevice("H100 SXM", {"float64": 67.0, "float32": 67.0, "bfloat16": 989.0, "float16": 989.0})


def project_to_device(result: CostEstimate, target: TargetDevice) -> CostEstimate:
    """``result`` rescaled to ``target``: every compute-bound component by (this device's measured GEMM
    rate in its dtype) / (target peak x efficiency); disk, network and the knapsack are kept as they are.
    A lower bound: the eigendecomposition, Cholesky, sorting and small candidate kernels reach less of
    a GPU's peak than a large GEMM does."""
    stages = []
    for stage in result.stages:
        parts = []
        for c in stage.components:
            here, there = result.gemm_gflops.get(c.dtype), target.tflops.get(c.dtype or "")
            factor = here / (there * 1e3 * target.efficiency) if here and there else 1.0
            parts.append(dataclasses.replace(c, seconds=c.seconds * factor))
        stages.append(dataclasses.replace(stage, seconds=sum(c.seconds for c in parts), components=tuple(parts)))
    note = (f"scaled from {result.device} by GEMM rates: {target.name} at {target.efficiency:.0%} of "
            + ", ".join(f"{k} {v:g}" for k, v in target.tflops.items()) + " TFLOP/s")
    return dataclasses.replace(result, device=target.name, stages=stages, notes=[*result.notes, note])
