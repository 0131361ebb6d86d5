"""Projected (``rocketlm estimate``) vs measured stage times on this machine (prints figures; not a test).

* SmolLM2-135M (the preset): the whole pipeline (``rocketlm.pipeline.compress``, as ``rocketlm
  compress`` runs it) at a small setting, stage by stage;
* a randomly initialised Llama-3.2-1B-shaped model (16 blocks, hidden 2048, MLP 8192, 32 heads, 8 KV
  heads, vocabulary 128256, float32), written to ``--llama-dir`` (default under /tmp) if missing:
  calibration over a few random windows (the weights' checksum included, as in the pipeline) and
  profiling of the first ``--llama-layers`` layers.

Every measured run is a separate process (so its peak RSS is its own) that records each stage's
wall seconds, CPU seconds and peak RSS. The estimate is made with each ``--clocks``: ``wall``
(the default product: comparable with the measured wall time when the load stays the same) and
``cpu`` (CPU seconds: with one thread, comparable with the measured CPU seconds whatever the load).
The load average is printed with every figure. On a shared machine run it with one thread:

    OMP_NUM_THREADS=1 python bench/bench_cost_validate.py --out runs/cost-validate.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

COARSE = "removed=0.1:0.7:0.1;ks=1,2,3"
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                rope_theta=500000.0, tie_word_embeddings=True, dtype="float32")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _config(samples: int, seq_len: int, grid: str):
    from rocketlm.config import GridConfig, RocketConfig
    return RocketConfig(removed_ratio=0.5, calib_samples=samples, calib_seq_len=seq_len, grid=GridConfig.parse(grid))


# -- measured side (each in its own process) ---------------------------------------------------------------

CPU: dict[str, float] = {}


@contextmanager
def cpu_stage(name: str, stats: dict):
    """``rocketlm.monitor.stage`` that also records the stage's CPU seconds in :data:`CPU`."""
    from rocketlm.monitor import stage
    start = time.process_time()
    with stage(name, stats) as record:
        yield record
    CPU[name] = CPU.get(name, 0.0) + time.process_time() - start


def _emit(stats: dict, extra: dict | None = None) -> None:
    print(json.dumps({"stages": {k: {"wall_s": v.seconds, "cpu_s": CPU.get(k), "peak_rss": v.peak_rss_bytes}
                                 for k, v in stats.items()}, "load_after": load(), **(extra or {})}))


def measure_smol(args) -> None:
    import rocketlm.pipeline as pipeline
    from rocketlm.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    pipeline.stage = cpu_stage  # the pipeline's stages, with CPU seconds recorded too
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline.compress(model, tokenizer, _config(args.smol_samples, args.smol_seq_len, args.grid),
                                   cache_dir=tmp, progress=False)
    _emit(result.stats, {"dense_layers": sum(c.dense for c in result.allocation.choices)})


def measure_llama(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rocketlm.calibration.run import run_calibration
    from rocketlm.calibration.store import GramStore
    from rocketlm.models.discovery import decoder_structure
    from rocketlm.pipeline import targets_fingerprint
    from rocketlm.profiling.run import run_profiling
    from rocketlm.profiling.store import ProfileStore

    model = AutoModelForCausalLM.from_pretrained(args.llama_dir).eval()
    config = _config(args.llama_samples, args.llama_seq_len, args.grid)
    structure = decoder_structure(model)
    windows = torch.randint(0, model.config.vocab_size, (args.llama_samples, args.llama_seq_len),
                            generator=torch.Generator().manual_seed(0))
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        grams = GramStore(Path(tmp), "grams", {})
        with cpu_stage("calibration", stats):
            targets_fingerprint(model, structure)  # the cache key, computed in the stage by the pipeline
            run_calibration(model, structure, windows, config, grams, progress=False)
        store = ProfileStore(Path(tmp), "profiles", {})
        with cpu_stage("profiling", stats):
            profiles = run_profiling(model, structure, grams, store, config, torch.float32, progress=False,
                                     layers=list(structure.all_targets[: args.llama_layers]))
    _emit(stats, {"layers": {p.name: p.seconds for p in profiles}})


def run_measurement(kind: str, args) -> dict:
    """One measured run in a fresh process (the same flags), its JSON line."""
    before = load()
    cmd = [sys.executable, __file__, "--measure", kind, *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    return {"load_before": before, **json.loads(out)}


# -- projected side ----------------------------------------------------------------------------------------

def run_estimate(model: str, config, max_probe_dim: int, clock: str) -> dict:
    from rocketlm.estimation import EstimateOptions, estimate
    before = load()
    result = estimate(model, config, EstimateOptions(max_probe_dim=max_probe_dim, clock=clock))
    return {"load_before": before, "load_after": load(), "clock": clock, "max_probe_dim": max_probe_dim,
            "result": result}


def _row(name: str, projected: float, measured: float, unit: str = "s") -> str:
    ratio = projected / measured if measured else float("nan")
    flag = "" if 0.75 <= ratio <= 1.25 else "  <-- outside 25%"
    return (f"    {name:<32} projected {projected:9.1f} {unit:<3}  measured {measured:9.1f} {unit:<3}  "
            f"ratio {ratio:5.2f}{flag}")


def compare(est: dict, measured: dict, stages: dict[str, float] | None = None) -> dict:
    """Print and return projected vs measured per stage (``stages``: projections replacing the estimate's)."""
    result, clock = est["result"], est["clock"]
    print(f"  estimate: {clock} clock, max probe dim {est['max_probe_dim']}, load {est['load_before']} -> "
          f"{est['load_after']}, took {result.estimate_seconds:.0f} s")
    rows = {}
    for name, got in measured["stages"].items():
        projected = (stages or {}).get(name, result.stage(name).seconds)
        value = got["wall_s"] if clock == "wall" else got["cpu_s"]
        rows[name] = {"projected_s": projected, "measured_s": value, "ratio": projected / value}
        print(_row(f"{name} ({clock} s)", projected, value))
        if clock == "wall":
            peak = result.stage(name).peak_bytes
            rows[name].update(projected_peak=peak, measured_peak=got["peak_rss"])
            print(_row(f"{name} peak RSS", peak / 2**20, got["peak_rss"] / 2**20, "MiB"))
    return rows


def validate_smol(args) -> dict:
    config = _config(args.smol_samples, args.smol_seq_len, args.grid)
    estimates = [run_estimate("smollm2-135m", config, args.max_probe_dim, c) for c in args.clocks.split(",")]
    measured = run_measurement("smol", args)
    print(f"SmolLM2-135M, {args.smol_samples} x {args.smol_seq_len} tokens, grid {args.grid!r}; measured at load "
          f"{measured['load_before']} -> {measured['load_after']}, {measured['dense_layers']} layers left dense")
    rows = [compare(est, measured) for est in estimates]
    return {"measured": measured, "compared": rows, "estimates": [_dump(e) for e in estimates]}


def _profiled_subset(result, names: list[str]) -> float:
    """Projected profiling of the named layers: theirs and their Gram groups' whitening."""
    groups = {result.layers[n]["group"] for n in names}
    return sum(result.layers[n]["profiling_s"] for n in names) + sum(result.whitening_seconds[g] for g in groups)


def validate_llama(args) -> dict:
    make_llama(Path(args.llama_dir))
    config = _config(args.llama_samples, args.llama_seq_len, args.grid)
    runs = [(int(dim), clock) for dim, clock in (item.split(":") for item in args.llama_estimates.split(","))]
    estimates = [run_estimate(args.llama_dir, config, dim, clock) for dim, clock in runs]
    measured = run_measurement("llama", args)
    names = list(measured["layers"])
    print(f"Llama-3.2-1B-shaped (random, float32), {args.llama_samples} x {args.llama_seq_len} tokens, grid "
          f"{args.grid!r}, profiling the first {len(names)} layers; measured at load {measured['load_before']} -> "
          f"{measured['load_after']}")
    rows = []
    for est in estimates:
        rows.append(compare(est, measured, {"profiling": _profiled_subset(est["result"], names)}))
        if est["clock"] == "wall":
            for name in names:
                print(_row("  " + name.split(".", 2)[-1], est["result"].layers[name]["profiling_s"],
                           measured["layers"][name]))
    return {"measured": measured, "compared": rows, "estimates": [_dump(e) for e in estimates]}


def _dump(est: dict) -> dict:
    return {**{k: v for k, v in est.items() if k != "result"}, "result": est["result"].to_json()}


def make_llama(path: Path) -> None:
    """A randomly initialised Llama-3.2-1B-shaped model (float32) saved to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B)).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=("smol", "llama", "both"), default="both")
    p.add_argument("--grid", default=COARSE)
    p.add_argument("--clocks", default="wall,cpu", help="clocks of the SmolLM2 estimates")
    p.add_argument("--smol-samples", type=int, default=16)
    p.add_argument("--smol-seq-len", type=int, default=256)
    p.add_argument("--max-probe-dim", type=int, default=4096, help="of the SmolLM2 estimates")
    p.add_argument("--llama-dir", default=str(Path(tempfile.gettempdir()) / "llama-3.2-1b-random"))
    p.add_argument("--llama-samples", type=int, default=4)
    p.add_argument("--llama-seq-len", type=int, default=256)
    p.add_argument("--llama-layers", type=int, default=7, help="profile the first N target layers")
    p.add_argument("--llama-estimates", default="4096:wall,4096:cpu,8192:cpu",
                   help="MAX_PROBE_DIM:CLOCK of each Llama estimate (4096: its MLP layers timed at half size)")
    p.add_argument("--measure", choices=("smol", "llama"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="write every figure as JSON here")
    args = p.parse_args()
    if args.measure:
        return (measure_smol if args.measure == "smol" else measure_llama)(args)
    results = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": os.environ.get("OMP_NUM_THREADS")}
    if args.which in ("smol", "both"):
        results["smollm2"] = validate_smol(args)
    if args.which in ("llama", "both"):
        results["llama_1b"] = validate_llama(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
