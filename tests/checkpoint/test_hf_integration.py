"""Checkpoints load with transformers' ``from_pretrained`` (the ``rocket`` quantization method), round trip
through ``save_pretrained``, evaluate with lm-eval's HFLM; format-1 checkpoints load and convert."""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from conftest import make_tiny_model, make_tiny_tokenizer
import rocketlm.runtime
from rocketlm import compress, convert_checkpoint, densify, load_compressed, save_compressed
from rocketlm.checkpoint.io import CheckpointError, read_manifest
from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.errors import OutputDirError
from rocketlm.integration import RocketQuantizationConfig
from rocketlm.integration.layers import compressed_layers
from rocketlm.runtime import convert_model

HF_ARCHS = ("llama", "qwen3", "mistral", "gemma3")
RUNTIME_CHOICES = ("factored", "merged", "sparse", "packed", "auto", "compact")
GRID = GridConfig(removed_ratios=(0.1, 0.3, 0.5, 0.7), ks=(1.0, 2.0, 3.0))
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")


@dataclasses.dataclass
class Saved:
    result: object
    path: Path
    logits: torch.Tensor  # of the in-memory compressed (canonical) model


def _ids():
    return make_tiny_tokenizer()(" ".join(f"w{i}" for i in range(40)), return_tensors="pt").input_ids


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def _compress_and_save(arch: str, root: Path) -> Saved:
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 400}" for i in range(6000)))
    config = RocketConfig(model="tiny", removed_ratio=0.3, cost="output", calib_files=(str(calib),), calib_samples=8,
                          calib_seq_len=32, grid=GRID)
    model = make_tiny_model(arch)
    result = compress(model, make_tiny_tokenizer(), config, cache_dir=root / "cache", progress=False)
    save_compressed(result, root / "ckpt")
    return Saved(result, root / "ckpt", _logits(model))


def _from_pretrained(path, runtime: str | None = None):
    from transformers import AutoModelForCausalLM
    if runtime is None:
        return AutoModelForCausalLM.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=RocketQuantizationConfig(runtime=runtime))


@pytest.fixture(scope="module", autouse=True)
def _form_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # the measured form table of `auto` stays in the test's tmp
        patch.setenv("ROCKETLM_CACHE", str(tmp_path_factory.mktemp("form-cache")))
        yield


@pytest.fixture(scope="module", params=HF_ARCHS)
def saved(request, tmp_path_factory):
    return _compress_and_save(request.param, tmp_path_factory.mktemp(f"hf-{request.param}"))


@pytest.fixture(scope="module")
def llama_saved(tmp_path_factory):
    return _compress_and_save("llama", tmp_path_factory.mktemp("hf-llama-single"))


@pytest.mark.parametrize("runtime", RUNTIME_CHOICES)
def test_from_pretrained_gives_the_in_memory_logits(saved, runtime):
    loaded = _from_pretrained(saved.path, runtime)
    expected = copy.deepcopy(saved.result.model)
    forms = convert_model(expected, runtime)
    assert loaded.rocketlm_forms == forms and len(forms) > 0
    assert torch.equal(_logits(loaded), _logits(expected))  # same form, same tensors: bitwise the same
    assert _close(_logits(loaded), saved.logits)  # and the canonical in-memory model's within float rounding
    kept = {name for name, form in forms.items() if form != "merged"}
    assert set(compressed_layers(loaded)) == kept
    qconfig = getattr(loaded.config, "quantization_config", None)
    assert (qconfig is None) == (not kept) and (qconfig is None or set(qconfig.layers) == kept)


def test_checkpoint_is_plain_transformers_files(llama_saved):
    config = json.loads((llama_saved.path / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "rocket" and qconfig["format_version"] == 2 and qconfig["runtime"] == "auto"
    layers = {c.name: c for c in llama_saved.result.allocation.choices if not c.dense}
    assert set(qconfig["layers"]) == set(layers)
    name, spec = next(iter(qconfig["layers"].items()))
    assert spec == {"d_in": layers[name].d_in, "d_out": layers[name].d_out, "k": layers[name].k, "s": layers[name].s,
                    "bias": False}
    with safe_open(str(llama_saved.path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert {f"{name}.U", f"{name}.V_values", f"{name}.V_mask"} <= keys and f"{name}.weight" not in keys
    assert not list(llama_saved.path.glob("*.py")) and not list(llama_saved.path.glob("*.bin"))
    assert read_manifest(llama_saved.path)["rocketlm_format_version"] == 2
    assert getattr(llama_saved.result.model.config, "quantization_config", None) is None  # in-memory config untouched


def test_runtime_by_config_and_checkpoint_default(llama_saved):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(llama_saved.path)
    config.quantization_config["runtime"] = "sparse"
    model = AutoModelForCausalLM.from_pretrained(llama_saved.path, config=config)
    assert set(model.rocketlm_forms.values()) == {"sparse"}
    default = _from_pretrained(llama_saved.path)  # the checkpoint's runtime: auto
    assert set(default.rocketlm_forms.values()) <= {"factored", "sparse", "packed", "merged"}
    loaded, tokenizer = load_compressed(llama_saved.path, runtime="factored")
    assert set(loaded.rocketlm_forms.values()) == {"factored"} and loaded.rocketlm_manifest["allocation"]
    assert tokenizer("w1 w2").input_ids
    with pytest.raises(ConfigError, match="runtime"):
        load_compressed(llama_saved.path, runtime="fast")


@pytest.mark.parametrize("runtime", ("factored", "sparse", "packed", "canonical", "merged"))
def test_save_pretrained_round_trip(llama_saved, runtime, tmp_path):
    loaded = _from_pretrained(llama_saved.path, runtime)
    loaded.save_pretrained(tmp_path / "again")
    again = _from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again), _logits(loaded))
    size = (tmp_path / "again" / "model.safetensors").stat().st_size
    original = (llama_saved.path / "model.safetensors").stat().st_size
    if runtime == "merged":  # the factors are gone: a standard dense checkpoint
        assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())
        assert size > original and not compressed_layers(again)
    else:
        assert size == original and again.rocketlm_forms == loaded.rocketlm_forms


def test_save_pretrained_with_some_layers_merged(llama_saved, tmp_path, monkeypatch):
    real_plan = rocketlm.runtime.plan_forms

    def mixed(model, runtime="auto", *args, **kwargs):
        return {name: "merged" if "q_proj" in name else "factored" for name in real_plan(model, "canonical")}

    monkeypatch.setattr(rocketlm.runtime, "plan_forms", mixed)
    loaded = _from_pretrained(llama_saved.path, "auto")
    monkeypatch.undo()
    merged = {n for n, f in loaded.rocketlm_forms.items() if f == "merged"}
    assert merged and all(isinstance(loaded.get_submodule(n), nn.Linear) for n in merged)
    assert set(loaded.config.quantization_config.layers) == set(loaded.rocketlm_forms) - merged
    loaded.save_pretrained(tmp_path / "mixed")
    with safe_open(str(tmp_path / "mixed" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert all(f"{n}.weight" in keys and f"{n}.U" not in keys for n in merged)
    again = _from_pretrained(tmp_path / "mixed", "factored")
    assert set(again.rocketlm_forms) == set(loaded.rocketlm_forms) - merged
    assert torch.equal(_logits(again), _logits(loaded))


def _write_format_1(saved: Saved, out: Path) -> None:
    """A checkpoint as rocketlm format 1 wrote it: no quantization_config, save_file weights, manifest v1."""
    model = saved.result.model
    out.mkdir()
    model.config.save_pretrained(out)
    saved.result.tokenizer.save_pretrained(out)
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "rocketlm_format": "1"})
    manifest = json.loads((saved.path / "rocketlm.json").read_text())
    import hashlib
    data = (out / "model.safetensors").read_bytes()
    manifest.update(rocketlm_format_version=1, weights_file={"name": "model.safetensors", "bytes": len(data),
                                                             "sha256": hashlib.sha256(data).hexdigest()})
    manifest["config"].pop("runtime", None)
    (out / "rocketlm.json").write_text(json.dumps(manifest))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_format_1_checkpoint_loads_and_converts(llama_saved, tmp_path):
    old = tmp_path / "v1"
    _write_format_1(llama_saved, old)
    loaded, _ = load_compressed(old, runtime="canonical")
    assert torch.equal(_logits(loaded), llama_saved.logits)
    message = convert_checkpoint(old)
    assert "from checkpoint format 1 to 2" in message
    assert read_manifest(old)["rocketlm_format_version"] == 2
    qconfig = json.loads((old / "config.json").read_text())["quantization_config"]
    assert qconfig == json.loads((llama_saved.path / "config.json").read_text())["quantization_config"]
    assert "nothing to do" in convert_checkpoint(old)
    assert torch.equal(_logits(_from_pretrained(old, "canonical")), llama_saved.logits)
    loaded, _ = load_compressed(old)  # verifies the (unchanged) weights' sha256
    assert _close(_logits(loaded), llama_saved.logits)


def test_damaged_checkpoints_are_checkpoint_errors(llama_saved, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_saved.path, ckpt)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_compressed(ckpt)
    with pytest.raises(CheckpointError, match="sha256"):
        convert_checkpoint(ckpt)
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(ckpt, verify=False)
    weights.write_bytes(b"\x00" * len(data))  # right size, unreadable header
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(ckpt, verify=False)


def test_missing_weights_and_foreign_directories_are_checkpoint_errors(llama_saved, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_saved.path, ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_compressed(ckpt)
    (ckpt / "rocketlm.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a rocketlm checkpoint"):
        load_compressed(empty)


def test_mismatched_config_and_newer_formats_are_checkpoint_errors(llama_saved, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_saved.path, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][name]["d_in"] += 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not belong"):
        load_compressed(ckpt)
    with pytest.raises(CheckpointError, match="does not belong"):
        _from_pretrained(ckpt)
    config["quantization_config"]["format_version"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer rocketlm"):
        _from_pretrained(ckpt)
    manifest = json.loads((ckpt / "rocketlm.json").read_text())
    (ckpt / "rocketlm.json").write_text(json.dumps({**manifest, "rocketlm_format_version": 3}))
    with pytest.raises(CheckpointError, match="newer rocketlm"):
        load_compressed(ckpt)


def test_interrupted_save_never_looks_like_a_checkpoint(llama_saved, tmp_path, monkeypatch):
    result, out = llama_saved.result, tmp_path / "ckpt"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(result.tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(result, out)
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    first = save_compressed(result, out)
    monkeypatch.setattr(result.tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(result, out)  # an interrupted overwrite leaves the earlier checkpoint whole
    monkeypatch.undo()
    assert read_manifest(out) == json.loads(json.dumps(first, default=str))
    assert torch.equal(_logits(load_compressed(out, runtime="canonical")[0]), llama_saved.logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    save_compressed(result, out)  # a complete overwrite replaces it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a rocketlm checkpoint"):
        save_compressed(result, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


@pytest.mark.parametrize("runtime", ("canonical", "factored", "sparse", "merged"))
def test_densify_every_form(llama_saved, runtime, tmp_path):
    from transformers import AutoModelForCausalLM
    model, _ = load_compressed(llama_saved.path, runtime=runtime)
    assert densify(model) is model
    assert not compressed_layers(model) and getattr(model.config, "quantization_config", None) is None
    assert _close(_logits(model), llama_saved.logits, rel=1e-5)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), _logits(model))


def test_dequantize_is_densify(llama_saved):
    model = _from_pretrained(llama_saved.path, "factored")
    model.dequantize()
    assert not compressed_layers(model) and getattr(model.config, "quantization_config", None) is None
    assert _close(_logits(model), llama_saved.logits, rel=1e-5)


def test_lm_eval_hflm_evaluates_a_checkpoint(llama_saved, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    result = dataclasses.replace(llama_saved.result, config=llama_saved.result.config.replace(runtime="factored"))
    save_compressed(result, tmp_path / "ckpt")
    requests = [Instance("loglikelihood", {}, ("w1 w2 w3", " w4 w5"), 0),
                Instance("loglikelihood", {}, ("w7 w8", " w9"), 1)]
    from_dir = HFLM(pretrained=str(tmp_path / "ckpt"), device="cpu", batch_size=1)
    assert set(from_dir.model.rocketlm_forms.values()) == {"factored"}
    assert set(compressed_layers(from_dir.model)) == set(from_dir.model.rocketlm_forms)
    in_memory = HFLM(pretrained=llama_saved.result.model, tokenizer=llama_saved.result.tokenizer, device="cpu",
                     batch_size=1)
    got, expected = from_dir.loglikelihood(requests), in_memory.loglikelihood(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, expected):
        assert lp == pytest.approx(lp_ref, rel=1e-5, abs=1e-5) and greedy == greedy_ref and lp < 0


def test_import_rocketlm_registers_the_method_for_a_fresh_process(llama_saved):
    code = ("import sys, rocketlm\n"
            "assert 'transformers.quantizers.auto' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(llama_saved.path)!r})\n"
            "print(sorted(set(model.rocketlm_forms.values())))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("[")
