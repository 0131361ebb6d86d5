"""Wall time of each compress stage with 1 and N processes (torchrun, gloo, one thread per process).

Every run starts from an empty cache, runs the real CLI (`python -m rocketlm compress` for one
process, `torchrun --nproc-per-node N -m rocketlm compress` otherwise), and reads the stage
times rank 0 recorded in the checkpoint's rocketlm.json (they include waiting for the other
ranks, so they are the stage's wall time) plus every rank's peak RSS. The allocations of all
runs are compared (they must be identical).

    python bench/bench_distributed.py                       # SmolLM2-135M at the compress defaults (~20+ min)
    python bench/bench_distributed.py --calib-samples 32 --seq-len 512 \\
        --grid "removed=0.05:0.70:0.05;ks=1.0:3.0:0.5"      # a smaller setting
    # offloaded (one decoder block resident per process): the model as a local safetensors directory first
    python -c "from rocketlm import load_model; m, t = load_model('smollm2-135m'); m.save_pretrained('smol'); t.save_pretrained('smol')"
    python bench/bench_distributed.py --model smol --offload disk --calib-samples 64 --seq-len 512 \
        --grid "removed=0.05:0.70:0.05;ks=1,1.5,2,2.5,3"
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("calibration", "profiling", "allocation", "compression")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(procs: int, args, out: Path, cache: Path) -> list[str]:
    launcher = [sys.executable, "-m", "rocketlm"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
        "--master-port", str(_free_port()), "-m", "rocketlm"]
    cmd = [*launcher, "compress", args.model, "--ratio", str(args.ratio), "--out", str(out),
           "--cache-dir", str(cache), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "-q",
           "--no-sequential"]  # the same work on 1 and N processes (the sequential pass runs in one process only)
    if args.cost:
        cmd += ["--cost", args.cost]
    if args.grid:
        cmd += ["--grid", args.grid]
    if args.data:
        cmd += ["--data", args.data]
    if args.offload:
        cmd += ["--offload", args.offload]
    return cmd


def run_once(procs: int, args, work: Path) -> dict:
    out, cache = work / f"ckpt-{procs}", work / f"cache-{procs}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(_command(procs, args, out, cache), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{procs} process(es) failed:\n{proc.stderr[-4000:]}")
    manifest = json.loads((out / "rocketlm.json").read_text())
    ranks = manifest["checks"].get("ranks") or [{"rank": 0, "stages": manifest["stages"]}]
    return {"procs": procs, "wall": wall, "stages": {s: manifest["stages"][s]["seconds"] for s in STAGES},
            "rss": [max(st["peak_rss_bytes"] for st in r["stages"].values()) for r in ranks],
            "allocation": [(c["name"], c["dense"], c["k"], c["s"]) for c in manifest["allocation"]["choices"]]}


def report(runs: list[dict], args) -> None:
    base = runs[0]
    print(f"{args.model}: {args.calib_samples} x {args.seq_len} calibration, grid {args.grid or 'default'}, "
          f"ratio {args.ratio}, cost {args.cost or 'default'}, offload {args.offload or 'default'}, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs")
    header = f"{'stage':<14}" + "".join(f"{str(r['procs']) + ' proc':>12}" for r in runs)
    header += "".join(f"{'x' + str(r['procs']):>8}" for r in runs[1:])
    print(header)
    rows = [(s, lambda r, s=s: r["stages"][s]) for s in STAGES]
    rows += [("stages total", lambda r: sum(r["stages"].values())), ("command wall", lambda r: r["wall"])]
    for name, get in rows:
        line = f"{name:<14}" + "".join(f"{get(r):>11.1f}s" for r in runs)
        line += "".join(f"{get(base) / max(get(r), 1e-9):>7.2f}x" for r in runs[1:])
        print(line)
    for r in runs:
        print(f"peak RSS, {r['procs']} proc: " + ", ".join(f"rank {i} {b / 2**30:.2f} GiB" for i, b in enumerate(r["rss"])))
    same = all(r["allocation"] == base["allocation"] for r in runs)
    print(f"allocation identical across runs: {'yes' if same else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--procs", default="1,2", help="comma list of process counts [1,2]")
    p.add_argument("--threads", type=int, default=1, help="threads per process [1]")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--cost", default=None, help="as rocketlm compress --cost [the compress default]")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--grid", default=None, help="as rocketlm compress --grid [the default grid]")
    p.add_argument("--data", default=None, help="data directory [$ROCKETLM_DATA]")
    p.add_argument("--work", default=None, help="directory for caches and checkpoints [a temporary one]")
    p.add_argument("--offload", default=None, choices=("none", "auto", "cpu", "disk"),
                   help="as rocketlm compress --offload (disk needs --model to be a local safetensors directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = [run_once(int(n), args, work) for n in args.procs.split(",")]
    report(runs, args)


if __name__ == "__main__":
    main()
