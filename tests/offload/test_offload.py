"""Offloaded (--offload disk) and in-memory runs give identical checkpoints on tiny models."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model, make_tiny_tokenizer
from rocketlm.checkpoint.io import load_compressed, save_compressed
from rocketlm.config import GridConfig, RocketConfig
from rocketlm.models.loading import load_model
from rocketlm.offload import is_offloaded, load_offloaded
from rocketlm.offload.safetensors_stream import StreamingSafetensorsWriter
from rocketlm.pipeline import compress

GRID = GridConfig(removed_ratios=(0.1, 0.3, 0.5), ks=(1.0, 2.0))


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{(i * 7) % 400}" for i in range(6000)))
    return str(path)


def _saved(arch, tmp_path):
    model = make_tiny_model(arch)
    model.config.num_hidden_layers  # noqa: B018
    path = tmp_path / f"dense-{arch}"
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return str(path)


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch,cost,refine_iters", [("llama", "output", 0), ("qwen3", "fisher", 2), ("gemma3", "fisher", 2)])
def test_offloaded_and_in_memory_checkpoints_are_identical(arch, cost, refine_iters, calib_file, tmp_path):
    path = _saved(arch, tmp_path)
    config = RocketConfig(model=path, removed_ratio=0.3, cost=cost, refine_iters=refine_iters, calib_files=(calib_file,),
                          calib_samples=8, calib_seq_len=32, calib_batch_size=3, grid=GRID, sensitivity_samples=3)
    model, tok = load_model(path)
    ref = compress(model, tok, config, cache_dir=tmp_path / "cache-mem", progress=False)
    save_compressed(ref, tmp_path / "mem")

    model, tok = load_offloaded(path, work_dir=tmp_path / "pieces")
    assert is_offloaded(model)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    offl, most = model.rocketlm_offload, []
    onload = offl.onload

    def counting_onload(b):
        onload(b)
        most.append(len(offl.resident))
    offl.onload = counting_onload
    off = compress(model, tok, config, cache_dir=tmp_path / "cache-off", progress=False)
    assert most and max(most) == 1  # never more than one decoder block materialised
    assert off.keys.calibration == ref.keys.calibration and off.keys.profile == ref.keys.profile
    assert off.model.rocketlm_offload.resident == set()
    save_compressed(off, tmp_path / "off")

    # the same candidate for every layer; the profiled errors agree to float32 rounding only: the in-memory run
    # profiles two layers at once on one thread each, the offloaded one a layer at a time on every thread
    fields = ("solve_seconds", "choices", "total_cost", "lower_bound")
    drop = lambda a: {k: v for k, v in a.to_json().items() if k not in fields}  # noqa: E731
    assert drop(off.allocation) == drop(ref.allocation)
    pick = lambda a: [(c.name, c.dense, c.removed_ratio, c.ks, c.k, c.s) for c in a.choices]  # noqa: E731
    assert pick(off.allocation) == pick(ref.allocation)
    errors = lambda a: [e for c in a.choices for e in (c.error_weight, c.error_output, c.cost)]  # noqa: E731
    assert errors(off.allocation) == pytest.approx(errors(ref.allocation), rel=1e-5, abs=1e-9)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "off" / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]
    ma = json.loads((tmp_path / "mem" / "rocketlm.json").read_text())
    mb = json.loads((tmp_path / "off" / "rocketlm.json").read_text())
    assert ma["dense_weights_bytes"] == mb["dense_weights_bytes"]
    # the offloaded checkpoint loads and runs like the in-memory one
    ids = make_tiny_tokenizer()(" ".join(f"w{i}" for i in range(20)), return_tensors="pt").input_ids
    la = load_compressed(tmp_path / "mem")[0](ids).logits
    lb = load_compressed(tmp_path / "off")[0](ids).logits
    assert torch.equal(la, lb)


def test_interrupted_offloaded_compression_resumes_from_its_pieces(calib_file, tmp_path, monkeypatch):
    """A run stopped during compression keeps the blocks it finished (piece + checks in the cache); the
    rerun factors only the rest and writes the checkpoint of an uninterrupted run."""
    import rocketlm.offload.pipeline as offload_pipeline
    path = _saved("qwen3", tmp_path)
    config = RocketConfig(model=path, removed_ratio=0.3, cost="output", refine_iters=1, calib_files=(calib_file,),
                          calib_samples=8, calib_seq_len=32, calib_batch_size=3, grid=GRID)
    model, tok = load_model(path)
    save_compressed(compress(model, tok, config, cache_dir=tmp_path / "cache-mem", progress=False), tmp_path / "mem")

    real, calls = offload_pipeline.apply_allocation, []

    def failing_on_block_1(*args, **kwargs):
        calls.append(sorted(kwargs["only"]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run while block 1 is factored
        return real(*args, **kwargs)
    monkeypatch.setattr(offload_pipeline, "apply_allocation", failing_on_block_1)
    model, tok = load_offloaded(path)
    with pytest.raises(KeyboardInterrupt):
        compress(model, tok, config, cache_dir=tmp_path / "cache", progress=False)
    (pieces,) = list((tmp_path / "cache" / "compressed").iterdir())
    assert sorted(p.name for p in pieces.iterdir()) == ["block-00000.json", "block-00000.safetensors"]

    calls.clear()
    model, tok = load_offloaded(path)
    result = compress(model, tok, config, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1 and all(name.startswith("model.layers.1.") for name in calls[0])  # block 0 reused
    save_compressed(result, tmp_path / "off")
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = make_tiny_tokenizer()(" ".join(f"w{i}" for i in range(20)), return_tensors="pt").input_ids
    assert torch.equal(load_compressed(tmp_path / "mem")[0](ids).logits, load_compressed(tmp_path / "off")[0](ids).logits)


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.uint8), "c": torch.randn(2).bfloat16()}
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                                    {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_offload_rejects_what_it_cannot_do(calib_file, tmp_path):
    from rocketlm.errors import ConfigError
    path = _saved("llama", tmp_path)
    model, tok = load_offloaded(path)
    config = RocketConfig(model=path, calib_files=(calib_file,), calib_samples=4, calib_seq_len=16, grid=GRID,
                          sequential=True)
    with pytest.raises(ConfigError, match="offload"):
        compress(model, tok, config, cache_dir=tmp_path / "c", progress=False)


def test_cli_offload_disk_writes_a_loadable_checkpoint(calib_file, tmp_path):
    from rocketlm.cli import main
    path = _saved("llama", tmp_path)
    out = tmp_path / "ckpt"
    rc = main(["compress", path, "--ratio", "0.3", "--out", str(out), "--calib", calib_file, "--calib-samples", "4",
               "--seq-len", "16", "--grid", "removed=0.3,0.5;ks=1,2", "--offload", "disk", "-q",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    manifest = json.loads((out / "rocketlm.json").read_text())
    assert manifest["config"]["offload"] == "disk" and manifest["checks"]["offload"] == "disk"
    load_compressed(out)


def test_offload_modes_resolve_and_validate(tmp_path):
    from rocketlm.config import ConfigError
    from rocketlm.offload.model import resolve_offload
    path = _saved("llama", tmp_path)
    assert resolve_offload("disk", path) == "disk" and resolve_offload("none", path) == "none"
    assert resolve_offload("cpu", path, "cpu") == "none"
    assert resolve_offload("auto", path) == "none"  # a tiny model fits
    assert resolve_offload("auto", path, headroom=0.0) == "disk"
    from rocketlm.offload.model import available_memory_bytes, weights_bytes
    copies = int(available_memory_bytes() / weights_bytes(path)) + 1  # processes of a host that each load a copy
    assert resolve_offload("auto", path, processes=copies // 4) == "none"
    assert resolve_offload("auto", path, processes=copies) == "disk"
    with pytest.raises(ConfigError, match="offload"):
        RocketConfig(offload="gpu")
    with pytest.raises(ConfigError, match="offload"):
        RocketConfig(offload="disk", sequential=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_remap_gives_fresh_mappings_of_the_same_values(arch, tmp_path):
    """After the fisher pass reads the whole head, remap() swaps every memory-mapped tensor for a fresh
    mapping (the old one, with its read pages, is freed); values, ties and outputs are unchanged."""
    path = _saved(arch, tmp_path)
    model, _ = load_offloaded(path, work_dir=tmp_path / "pieces")
    off = model.rocketlm_offload
    assert off.mapped  # the embedding at least
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = dict(model.named_parameters(remove_duplicate=False))
    old = {name: (params[name], params[name].data_ptr()) for name in off.mapped}
    off.remap()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (param, ptr) in old.items():
        assert params[name] is not param and params[name].data_ptr() != ptr, name  # a new mapping
        assert torch.equal(params[name], param), name
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:
        assert head is embedding
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
