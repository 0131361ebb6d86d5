"""Helpers of the multi-process tests: start ranks with torch.multiprocessing (spawn), run the
Python API on each, and write what happened to ``OUT/rank<r>.json``; compare two runs."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inject(rank: int, fault: dict | None) -> None:
    """Make this rank fail (``raise_after`` profiled layers) or hang (``sleep`` seconds, once) while profiling."""
    if not fault or fault["rank"] != rank:
        return
    import rocketlm.profiling.run as run
    real, calls = run.profile_layer, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] > fault.get("raise_after", 10**9):
            raise ValueError(f"injected failure at profiled layer {calls[0]}")
        if "sleep" in fault and calls[0] == 1:
            time.sleep(fault["sleep"])
        return real(*args, **kwargs)
    run.profile_layer = faulty


def compress_rank(rank: int, world: int, port: int, model_dir: str, config, cache_dirs: list[str], out: str,
                  fault: dict | None = None, timeout_s: float = 60.0, offload: bool = False) -> None:
    """One rank of a run of :func:`rocketlm.compress` (``offload``: the model loaded with ``--offload disk``);
    rank 0 saves the checkpoint to ``OUT/ckpt``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rocketlm import compress, load_model, save_compressed
    from rocketlm.distributed import init_from_env

    start, record = time.perf_counter(), {"rank": rank}
    dist = init_from_env("cpu", timeout_s=timeout_s)
    try:
        _inject(rank, fault)
        if offload:
            from rocketlm.offload.model import load_offloaded
            model, tok = load_offloaded(model_dir)
        else:
            model, tok = load_model(model_dir)
        result = compress(model, tok, config, cache_dir=cache_dirs[rank], progress=False, dist=dist)
        dist.on_main(lambda: save_compressed(result, Path(out) / "ckpt"), "writing the checkpoint", broadcast=False)
        record.update(ok=True, choices=[(c.name, c.dense, c.k, c.s) for c in result.allocation.choices],
                      profiles=len(result.profiles))
    except Exception as exc:  # noqa: BLE001 - recorded for the test to check
        record.update(ok=False, type=type(exc).__name__, message=str(exc))
    finally:
        dist.close()
    record["seconds"] = time.perf_counter() - start
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def spawn_compress(world: int, model_dir, config, cache_dirs, out, fault=None, timeout_s: float = 60.0,
                   offload: bool = False) -> list[dict]:
    """Run ``world`` ranks to the end; every rank's record."""
    import torch.multiprocessing as mp
    Path(out).mkdir(parents=True, exist_ok=True)
    cache_dirs = [str(c) for c in cache_dirs]
    mp.start_processes(compress_rank, args=(world, free_port(), str(model_dir), config, cache_dirs, str(out), fault,
                                            timeout_s, offload), nprocs=world, start_method="spawn", join=True)
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def gram_blocks(cache: Path) -> dict[str, dict]:
    """``{file name: {group: tensor, "tokens": n}}`` of the one Gram store under ``cache``."""
    from safetensors import safe_open
    (store,) = list((Path(cache) / "grams").iterdir())
    blocks = {}
    for path in sorted(store.glob("block_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            blocks[path.name] = {k: handle.get_tensor(k) for k in handle.keys()}
            blocks[path.name]["tokens"] = int(handle.metadata()["tokens"])
    return blocks


def assert_grams_match(cache_a: Path, cache_b: Path, rel: float = 1e-10) -> None:
    a, b = gram_blocks(cache_a), gram_blocks(cache_b)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert a[name].pop("tokens") == b[name].pop("tokens")
        for group, G in a[name].items():
            gap = (G - b[name][group]).abs().max() / G.abs().max()
            assert gap <= rel, (name, group, float(gap))


def assert_sensitivities_match(cache_a: Path, cache_b: Path, rel: float = 1e-10) -> None:
    """The one sensitivity cache file under each cache holds the same per-layer figures."""
    import json
    (a,) = [json.loads(p.read_text())["layers"] for p in (Path(cache_a) / "sensitivity").glob("*.json")]
    (b,) = [json.loads(p.read_text())["layers"] for p in (Path(cache_b) / "sensitivity").glob("*.json")]
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name]["d_out"] == b[name]["d_out"]
        for key in ("grad_sq", "out_sq"):
            assert abs(a[name][key] - b[name][key]) <= rel * abs(a[name][key]), (name, key)


def assert_checkpoints_match(ckpt_a: Path, ckpt_b: Path) -> None:
    """Same tensors (names, shapes, dtypes), equal masks, values equal up to float32 rounding."""
    from safetensors.torch import load_file
    a, b = load_file(str(Path(ckpt_a) / "model.safetensors")), load_file(str(Path(ckpt_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if name.endswith("V_mask") or not a[name].is_floating_point():
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5 * float(a[name].abs().max()), msg=name)


def allocation_of(ckpt: Path) -> list[tuple]:
    manifest = json.loads((Path(ckpt) / "rocketlm.json").read_text())
    return [(c["name"], c["dense"], c.get("k"), c.get("s")) for c in manifest["allocation"]["choices"]]
