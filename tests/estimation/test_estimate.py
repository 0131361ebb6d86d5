"""``rocketlm estimate`` on a tiny config without weights: positive finite stage times and memory."""
import json
import math

import pytest

from conftest import make_tiny_config
from rocketlm.cli import main
from rocketlm.config import GridConfig, RocketConfig
from rocketlm.errors import ConfigError
from rocketlm.estimation import H100, EstimateOptions, estimate, project_to_device
from rocketlm.estimation.project import lpt_pack, rank_batches

GRID = "removed=0.1:0.7:0.2;ks=1,2,3"
STAGES = ["calibration", "profiling", "allocation", "compression"]


@pytest.fixture
def config_dir(tmp_path):
    """A directory with only a config.json (no weights, no tokenizer)."""
    path = tmp_path / "tiny-config"
    make_tiny_config("llama").save_pretrained(path)
    return path


def _config(**changes) -> RocketConfig:
    return RocketConfig(calib_samples=6, calib_seq_len=32, calib_batch_size=2, grid=GridConfig.parse(GRID), **changes)


def _check(result) -> None:
    assert [s.name for s in result.stages] == STAGES
    for stage in result.stages:
        assert math.isfinite(stage.seconds) and stage.seconds > 0, stage
        assert stage.peak_bytes > 0 and all(v >= 0 for v in stage.memory.values()), stage
        assert abs(sum(c.seconds for c in stage.components) - stage.seconds) < 1e-9 * max(1.0, stage.seconds)


def test_estimate_tiny_config_without_weights(config_dir):
    result = estimate(str(config_dir), _config(), EstimateOptions(repeats=1))
    _check(result)
    summary = result.model_summary
    assert summary["blocks"] == 2 and summary["target_layers"] == 14
    assert summary["gram_groups"] == 8  # q/k/v share one input, gate/up another: 4 per block
    assert sorted(map(tuple, summary["shapes"])) == [(64, 32), (64, 64), (64, 128), (128, 64)]
    assert result.gram_cache_bytes == 2 * 8 * (3 * 64 * 64 + 128 * 128)
    json.dumps(result.to_json(), default=str)  # serialisable
    # the default "fisher" cost: its sensitivities (block inputs of min(16, 6) windows) belong to the allocation
    allocation = result.stage("allocation")
    assert [c.name for c in allocation.components][:2] == ["sensitivity: block forwards, then forward + backward per block",
                                                          "sensitivity: head forward + backward"]
    assert allocation.memory["sensitivity block inputs"] == 2 * 6 * 32 * 64 * 4  # blocks x windows x seq x hidden x 4
    weight = estimate(str(config_dir), _config().replace(cost="weight"), EstimateOptions(repeats=1))
    assert not any(c.name.startswith("sensitivity") for c in weight.stage("allocation").components)


def test_estimate_from_config_json_file_and_processes(config_dir):
    single = estimate(str(config_dir / "config.json"), _config(), EstimateOptions(repeats=1))
    _check(single)
    two = estimate(str(config_dir / "config.json"), _config(), EstimateOptions(nproc=2, repeats=1))
    _check(two)
    names = [c.name for c in two.stage("calibration").components]
    assert "all_reduce of the Grams" in names
    # the sensitivities are data-parallel: the slowest of 2 processes holds ceil(6 / 2) = 3 windows' block inputs
    assert two.stage("allocation").memory["sensitivity block inputs"] == 2 * 3 * 32 * 64 * 4
    gpu = project_to_device(single, H100)
    _check(gpu)
    assert gpu.stage("profiling").seconds < single.stage("profiling").seconds


def test_scaled_down_probe_is_used_for_wide_layers(config_dir):
    result = estimate(str(config_dir), _config(), EstimateOptions(repeats=1, max_probe_dim=32))
    _check(result)
    wide = next(p for p in result.layer_probes if (p["d_in"], p["d_out"]) == (128, 64))
    assert (wide["probe_d_in"], wide["probe_d_out"]) == (32, 16)
    assert wide["profile_s"] > 0 and wide["candidates"] > 0


def test_rank_batches_and_packing():
    assert rank_batches(10, 4, 0, 1) == [4, 4, 2]
    assert [rank_batches(10, 4, r, 2) for r in range(2)] == [[4], [4, 2]]
    parts = lpt_pack({"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0}, 2)
    assert sorted(map(sorted, parts)) == [["a", "d"], ["b", "c"]]


def test_cli_estimate_on_config_dir(config_dir, tmp_path, capsys):
    out = tmp_path / "estimate.json"
    rc = main(["estimate", str(config_dir), "--calib-samples", "4", "--seq-len", "16", "--calib-batch-size", "2",
               "--grid", GRID, "--repeats", "1", "--nproc", "2", "--target", "h100", "--shapes",
               "--ks-search", "exhaustive", "--offload", "disk", "--out", str(out), "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in STAGES + ["total", "on H100 SXM", "Gram cache on disk", "not modelled: offload='disk'"]:
        assert name in printed
    data = json.loads(out.read_text())
    assert data["nproc"] == 2 and data["config"]["calib_samples"] == 4 and data["config"]["ks_search"] == "exhaustive"
    assert all(s["seconds"] > 0 for s in data["stages"]) and data["target"]["device"] == "H100 SXM"


def test_cli_estimate_rejects_a_bad_target(config_dir, capsys):
    assert main(["estimate", str(config_dir), "--target", "nonsense", "-q"]) == 2
    assert "--target" in capsys.readouterr().err


def test_estimate_models_the_sequential_pass(config_dir):
    plain = estimate(str(config_dir), _config(sequential=False), EstimateOptions(repeats=1))
    seq = estimate(str(config_dir), _config(sequential=True, upstream_correction=True), EstimateOptions(repeats=1))
    _check(seq)
    parts = {c.name: c.seconds for c in seq.stage("compression").components}
    name = "sequential calibration (forwards to each group's input, Grams, dense stream and cross-Grams)"
    assert parts[name] > 0
    assert name not in {c.name for c in plain.stage("compression").components}
    memory = seq.stage("compression").memory
    assert memory["sequential hidden states"] == 2 * 6 * 32 * 64 * 4  # two streams x windows x seq x hidden x 4
    assert memory["dense inputs of one block"] == 6 * 32 * 4 * (3 * 64 + 128)  # tokens x 4 x summed group widths
    assert not any("not modelled" in note for note in seq.notes)
    without_cross = estimate(str(config_dir), _config(sequential=True, upstream_correction=False),
                             EstimateOptions(repeats=1))
    assert "sequential calibration (forwards to each group's input, Grams)" in {
        c.name for c in without_cross.stage("compression").components}
    assert "dense block copy" not in without_cross.stage("compression").memory


@pytest.mark.parametrize("cap_widths,kept_widths", [(320, 320), (192, 192), (191, 128), (63, 0)])
def test_estimate_counts_the_most_dense_inputs_a_block_can_keep(config_dir, monkeypatch, cap_widths, kept_widths):
    """The pass keeps a block's dense inputs for the groups holding compressed layers when they fit under its cap:
    a block where the allocation left some groups dense may keep the others although all four would not fit."""
    import rocketlm.estimation.project as project
    tokens_x_4 = 6 * 32 * 4  # group widths of the tiny config: q/k/v 64, o 64, gate/up 64, down 128
    monkeypatch.setattr(project, "DENSE_INPUTS_BYTES", tokens_x_4 * cap_widths)
    result = estimate(str(config_dir), _config(sequential=True, upstream_correction=True), EstimateOptions(repeats=1))
    assert result.stage("compression").memory["dense inputs of one block"] == tokens_x_4 * kept_widths


def test_estimate_runs_the_sequential_pass_on_its_windows_only(config_dir):
    def sequential(samples):
        result = estimate(str(config_dir), _config(sequential=True, upstream_correction=True,
                                                   sequential_samples=samples), EstimateOptions(repeats=1))
        stage = result.stage("compression")
        seconds = next(c.seconds for c in stage.components if c.name.startswith("sequential calibration"))
        return seconds, stage.memory, stage.notes
    all_six, memory6, notes6 = sequential(64)  # more than the 6 calibration windows: all of them
    two, memory2, notes2 = sequential(2)
    assert memory6["sequential hidden states"] == 2 * 6 * 32 * 64 * 4
    assert memory2["sequential hidden states"] == 2 * 2 * 32 * 64 * 4  # two streams x 2 windows x seq x hidden x 4
    assert memory2["dense inputs of one block"] == 2 * 32 * 4 * (3 * 64 + 128)
    assert any("sequential pass on 2 windows" in n for n in notes2) and any("on 6 windows" in n for n in notes6)
    # one batch of 2 windows per block instead of three: a third of the per-batch time, the per-block part unchanged
    assert two < all_six


def test_estimate_decides_the_default_sequential_pass_as_the_run_does(config_dir):
    def has_pass(config, nproc=1):
        result = estimate(str(config_dir), config, EstimateOptions(nproc=nproc, repeats=1))
        return any(c.name.startswith("sequential calibration") for c in result.stage("compression").components)
    assert has_pass(_config(removed_ratio=0.5))  # auto: on from 35% removed in one process
    assert not has_pass(_config(removed_ratio=0.2))
    assert not has_pass(_config(removed_ratio=0.5), nproc=2)  # auto stays off where it cannot run, no refusal


def test_estimate_refuses_the_sequential_pass_on_several_processes(config_dir):
    with pytest.raises(ConfigError, match="one process"):
        estimate(str(config_dir), _config(sequential=True), EstimateOptions(nproc=2, repeats=1))


def test_fewest_compressed_layers_that_reach_the_budget(config_dir):
    """The lower end of the compression stage's range: the largest layers, each at the grid's largest ratio."""
    from rocketlm.estimation.describe import describe_model, read_config
    from rocketlm.estimation.project import fewest_compressed

    d, _ = describe_model(str(config_dir), read_config(str(config_dir)), (), (), None, "cpu")
    sizes = {layer.name: layer.d_in * layer.d_out for layer in d.layers}
    total = sum(sizes.values())
    for ratio in (0.05, 0.2, 0.4, 0.6):
        fewest = fewest_compressed(d, ratio, 0.7)
        assert 0.7 * sum(sizes[n] for n in fewest) >= ratio * total  # reaches the budget
        assert 0.7 * (sum(sizes[n] for n in fewest) - min(sizes[n] for n in fewest)) < ratio * total  # none spare
        assert min(sizes[n] for n in fewest) >= max((s for n, s in sizes.items() if n not in fewest), default=0)
    assert len(fewest_compressed(d, 0.8, 0.7)) == len(d.layers)  # beyond reach: every layer
    notes = estimate(str(config_dir), _config(removed_ratio=0.2), EstimateOptions(repeats=1)).stage("compression").notes
    assert any("the fewest that reach the budget" in note for note in notes)


@pytest.mark.parametrize("clock, copies", [("wall", 3), ("cpu", 1)])
def test_profile_probe_runs_the_stage_s_layers_at_once(monkeypatch, clock, copies):
    """Under the wall clock profile_layer is timed with ``concurrent`` copies running at once, each on the caller's
    thread count (the profiling stage's workers share the caches); the CPU clock times one copy alone."""
    import threading

    import torch

    from rocketlm.estimation import probe_layers
    from rocketlm.estimation.timing import using_clock

    calls, threads, real = [], [], probe_layers.profile_layer
    together = threading.Barrier(copies, timeout=30)  # broken unless ``copies`` calls run at the same time

    def counting(*args, **kwargs):
        together.wait()
        calls.append(threading.get_ident())
        threads.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_layers, "profile_layer", counting)
    settings = probe_layers.LayerSettings(GridConfig.parse(GRID), 0.3, concurrent=3)
    with using_clock(clock):
        seconds, count, _ = probe_layers._profile_once(24, 16, settings, repeats=1, device="cpu")
    assert seconds > 0 and count > 0
    assert len(calls) == 2 * copies  # a warm-up and one timed call, each of ``copies`` profile_layer calls
    assert len(set(calls)) == copies and set(threads) == {torch.get_num_threads()}


@pytest.mark.parametrize("workers", [1, 2])
def test_compression_step_is_timed_once_per_shape(config_dir, monkeypatch, workers):
    """With several profiling workers the layer shapes are probed a second time, with the stage's copies at once,
    for the profiling projection only: the compression step is timed in the first pass alone."""
    from rocketlm.estimation import probe_layers

    compress_calls, real = [], probe_layers._compress_one
    monkeypatch.setattr(probe_layers, "_compress_one", lambda *a, **k: compress_calls.append(a[1].shape) or real(*a, **k))
    profiled, real_profile = [], probe_layers.profile_layer
    monkeypatch.setattr(probe_layers, "profile_layer", lambda *a, **k: profiled.append(1) or real_profile(*a, **k))
    result = estimate(str(config_dir), _config(profile_workers=workers), EstimateOptions(repeats=1))
    _check(result)
    shapes = len(result.layer_probes)
    assert shapes == 4 and all(p["compress_s"] > 0 for p in result.layer_probes)
    assert len(compress_calls) == 2 * shapes  # a warm-up and one timed call per shape, never in the second pass
    assert len(profiled) >= 2 * shapes * (1 + workers if workers > 1 else 1)  # the second pass did run
