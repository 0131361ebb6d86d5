"""Two-process (gloo) runs on a tiny model, checked against the single-process run: Grams at 1e-10
relative, the same candidate for every layer, checkpoint tensors equal up to float rounding;
a failing or hung rank ends the run quickly with an error naming it; interrupted runs resume."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from dist_workers import (allocation_of, assert_checkpoints_match, assert_grams_match, assert_sensitivities_match,
                          free_port, spawn_compress)
from rocketlm.cli import main
from rocketlm.config import GridConfig, RocketConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

GRID = "removed=0.1,0.3,0.5,0.7;ks=1,2,3"
ARGS = ["--ratio", "0.3", "--cost", "fisher", "--refine-iters", "2", "--sensitivity-samples", "3", "--calib-samples", "8", "--seq-len", "32", "--calib-batch-size", "2",
        "--grid", GRID, "-q"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("qwen2").save_pretrained(path)  # qwen2: biases on q/k/v
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    """The single-process CLI run (one thread, as each rank), its cache and checkpoint."""
    root = tmp_path_factory.mktemp("single")
    data = root / "data" / "calib"
    data.mkdir(parents=True)
    (data / "a.txt").write_text(" ".join(f"w{(i * 13) % 400}" for i in range(5000)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["compress", str(tiny_dir), "--out", str(root / "ckpt"), "--cache-dir", str(root / "cache"),
                     "--data", str(root / "data"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _config(single_root: Path) -> RocketConfig:
    return RocketConfig(model="tiny", removed_ratio=0.3, cost="fisher", refine_iters=2, sensitivity_samples=3,
                        calib_files=(str(single_root / "data/calib/a.txt"),),
                        calib_samples=8, calib_seq_len=32, calib_batch_size=2, grid=GridConfig.parse(GRID))


def test_torchrun_two_processes_equal_single_process(tiny_dir, single, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROCKETLM_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "rocketlm", "compress", str(tiny_dir), "--out", str(tmp_path / "ckpt"), "--cache-dir",
           str(tmp_path / "cache"), "--data", str(single / "data"), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model.safetensors:") == 1  # only rank 0 prints the summary
    assert_grams_match(single / "cache", tmp_path / "cache")
    assert_sensitivities_match(single / "cache", tmp_path / "cache")  # 3 windows: rank 0 measured 1, rank 1 2
    assert allocation_of(tmp_path / "ckpt") == allocation_of(single / "ckpt")
    assert_checkpoints_match(single / "ckpt", tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "rocketlm.json").read_text())
    assert [r["rank"] for r in manifest["checks"]["ranks"]] == [0, 1]
    store = Path(manifest["checks"]["profile_store"])
    assert len(store.read_text().splitlines()) == len(manifest["allocation"]["choices"])  # each layer once
    assert not list(store.parent.glob("layers.rank*.jsonl"))  # shards merged and removed


def test_rank_failure_names_the_rank_and_the_run_resumes(tiny_dir, single, tmp_path):
    config, caches = _config(single), [tmp_path / "cache"] * 2
    start = time.perf_counter()
    records = spawn_compress(2, tiny_dir, config, caches, tmp_path / "failed", fault={"rank": 1, "raise_after": 2})
    assert time.perf_counter() - start < 120
    assert records[0]["ok"] is False and records[0]["type"] == "DistributedError"
    assert "rank 1 of 2" in records[0]["message"] and "injected failure" in records[0]["message"]
    assert "profiling" in records[0]["message"]
    assert records[1]["ok"] is False and records[1]["type"] == "ValueError"
    (store_dir,) = list((tmp_path / "cache" / "profiles").iterdir())
    kept = {}
    for shard in store_dir.glob("layers.rank*.jsonl"):  # what each rank finished before the failure
        kept.update({p["name"]: p["seconds"] for p in map(json.loads, shard.read_text().splitlines())})
    assert len(kept) >= 2
    records = spawn_compress(2, tiny_dir, config, caches, tmp_path / "resumed")
    assert all(r["ok"] for r in records), records
    reused = {p["name"]: p["seconds"] for p in map(json.loads, (store_dir / "layers.jsonl").read_text().splitlines())}
    assert all(reused[name] == seconds for name, seconds in kept.items())  # not profiled again
    assert [tuple(c) for c in records[0]["choices"]] == allocation_of(single / "ckpt")
    assert records[0]["profiles"] == len(reused) and records[1]["profiles"] == 0


def test_hung_rank_is_named_after_the_timeout(tiny_dir, single, tmp_path):
    start = time.perf_counter()
    records = spawn_compress(2, tiny_dir, _config(single), [tmp_path / "cache"] * 2, tmp_path / "hung",
                             fault={"rank": 1, "sleep": 8.0}, timeout_s=3.0)
    assert time.perf_counter() - start < 120
    assert records[0]["ok"] is False and records[0]["type"] == "DistributedError"
    assert "rank 1 of 2 did not finish profiling within 3 s" in records[0]["message"]
    assert records[1]["ok"] is False


def test_separate_caches_without_shared_file_system(tiny_dir, single, tmp_path):
    """Ranks that do not see rank 0's cache directory (other machines) keep their own Gram copy."""
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    records = spawn_compress(2, tiny_dir, _config(single), caches, tmp_path / "out")
    assert all(r["ok"] for r in records), records
    assert_grams_match(single / "cache", caches[0])
    assert_grams_match(caches[0], caches[1], rel=0.0)
    assert allocation_of(tmp_path / "out" / "ckpt") == allocation_of(single / "ckpt")
    assert_checkpoints_match(single / "ckpt", tmp_path / "out" / "ckpt")


def test_torchrun_offloaded_two_processes_equal_single_process_in_memory(tiny_dir, single, tmp_path):
    """--offload disk under torchrun: each rank holds one block at a time, calibration and sensitivities
    data-parallel, profiling layer-parallel, compression block-parallel (pieces handed over in the cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROCKETLM_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "rocketlm", "compress", str(tiny_dir), "--offload", "disk", "--out", str(tmp_path / "ckpt"),
           "--cache-dir", str(tmp_path / "cache"), "--data", str(single / "data"), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model.safetensors:") == 1
    assert_grams_match(single / "cache", tmp_path / "cache")
    assert_sensitivities_match(single / "cache", tmp_path / "cache")
    assert allocation_of(tmp_path / "ckpt") == allocation_of(single / "ckpt")
    assert_checkpoints_match(single / "ckpt", tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "rocketlm.json").read_text())
    assert manifest["checks"]["offload"] == "disk" and [r["rank"] for r in manifest["checks"]["ranks"]] == [0, 1]
    store = Path(manifest["checks"]["profile_store"])
    assert len(store.read_text().splitlines()) == len(manifest["allocation"]["choices"])
    assert not list(store.parent.glob("layers.rank*.jsonl"))
    (pieces,) = list((tmp_path / "cache" / "compressed").iterdir())
    blocks = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(list(pieces.glob("block-*.safetensors"))) == blocks and not list(pieces.glob("*.partial"))


def test_offloaded_ranks_without_a_shared_cache_are_refused(tiny_dir, single, tmp_path):
    """The compressed blocks travel as files in the cache: ranks that do not see it stop before calibrating."""
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    records = spawn_compress(2, tiny_dir, _config(single), caches, tmp_path / "out", offload=True)
    assert all(r["ok"] is False for r in records)
    assert any("shared file system" in r["message"] for r in records), records
    assert not (caches[0] / "grams").exists()
