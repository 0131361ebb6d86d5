import json

import pytest
import torch

from conftest import TINY_GRID_RATIOS, make_tiny_model, make_tiny_tokenizer, tiny_ids, tiny_rocket_config
from rocketlm.checkpoint.io import load_compressed, save_compressed
from rocketlm.compression.modules import SparseDictionaryLinear
from rocketlm.config import ConfigError, GridConfig, RocketConfig
from rocketlm.evaluation.perplexity import perplexity, token_windows, wikitext2_rows
from rocketlm.pipeline import compress



def test_compress_save_load_gives_identical_logits(tiny_arch, calib_file, tmp_path):
    model, tok = make_tiny_model(tiny_arch), make_tiny_tokenizer()
    result = compress(model, tok, tiny_rocket_config(calib_file), cache_dir=tmp_path / "cache", progress=False)
    alloc = result.allocation
    assert abs(alloc.achieved_removed_ratio - 0.3) < 0.02 and alloc.achieved_removed_ratio >= 0.3
    compressed = [m for m in model.modules() if isinstance(m, SparseDictionaryLinear)]
    assert len(compressed) == sum(not c.dense for c in alloc.choices) > 0
    # the shipped factors reproduce the profiled errors
    assert result.checks["profile_vs_shipped"] < 1e-6
    with torch.no_grad():
        logits = model(tiny_ids()).logits
    manifest = save_compressed(result, tmp_path / "ckpt")
    assert manifest["weights_file"]["bytes"] < manifest["dense_weights_bytes"]
    loaded, _ = load_compressed(tmp_path / "ckpt", runtime="canonical")  # the stored form: bitwise the same
    with torch.no_grad():
        assert torch.equal(loaded(tiny_ids()).logits, logits)
    for m in compressed[:2]:  # compact storage: s values per column, not a dense V
        assert m.V_values.shape == (m.s, m.out_features)


def test_profiles_resume_and_config_changes_do_not_reuse(calib_file, tmp_path):
    tok = make_tiny_tokenizer()
    cache = tmp_path / "cache"
    first = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file), cache_dir=cache, progress=False)
    store = first.checks["profile_store"]
    lines = open(store).read().splitlines()
    # simulate an interruption in the middle of profiling: half the layers and a torn last line
    with open(store, "w") as handle:
        handle.write("\n".join(lines[:5]) + "\n" + lines[5][:40])
    again = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file), cache_dir=cache, progress=False)
    assert again.checks["profile_store"] == store
    # the same candidates with the same errors (to the rounding of the threads the re-profiled layers ran on)
    shapes = lambda p: [(c.removed_ratio, c.ks, c.k, c.s, c.kept_values) for c in p.candidates]  # noqa: E731
    assert [shapes(p) for p in again.profiles] == [shapes(p) for p in first.profiles]
    for a, b in zip(first.profiles, again.profiles):
        errors = lambda p: [e for c in p.candidates for e in (c.error_weight, c.error_output)]  # noqa: E731
        assert errors(b) == pytest.approx(errors(a), rel=1e-9)
    assert len(open(store).read().splitlines()) == len(lines)
    pick = lambda alloc: [(c.name, c.dense, c.removed_ratio, c.ks) for c in alloc.choices]  # noqa: E731
    assert pick(again.allocation) == pick(first.allocation)
    other = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file, grid=GridConfig((0.2, 0.4), (1.0, 2.0))),
                     cache_dir=cache, progress=False)
    assert other.checks["profile_store"] != store
    reseeded = compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file, seed=7), cache_dir=cache, progress=False)
    assert reseeded.keys.calibration != first.keys.calibration


def test_costs_give_different_best_ks_from_one_profile(calib_file, tmp_path):
    tok = make_tiny_tokenizer()
    run = lambda **kw: compress(make_tiny_model("llama"), tok, tiny_rocket_config(calib_file, **kw),  # noqa: E731
                                cache_dir=tmp_path, progress=False)
    w, o = run(cost="weight", ks_search="exhaustive"), run(cost="output", ks_search="exhaustive")
    assert w.keys.profile == o.keys.profile  # one exhaustive profiling pass serves both costs
    assert w.allocation.achieved_removed_ratio >= 0.3 and o.allocation.achieved_removed_ratio >= 0.3
    # the ks search (the default) profiles for the run's cost on a grid long enough for it to skip candidates:
    # its own store, the exhaustive run's allocation
    fine = GridConfig(TINY_GRID_RATIOS, tuple(round(1.0 + 0.25 * i, 2) for i in range(9)))
    o = run(cost="output", ks_search="exhaustive", grid=fine)
    searched = run(cost="output", grid=fine)
    assert searched.keys.profile != o.keys.profile
    assert run(cost="output").keys.profile == w.keys.profile  # a 3-ks grid: one exhaustive profile serves all
    assert all(p.ks_search == "auto" and p.search_costs == ["output"] for p in searched.profiles)
    assert ([(c.name, c.removed_ratio, c.ks) for c in searched.allocation.choices]
            == [(c.name, c.removed_ratio, c.ks) for c in o.allocation.choices])


def test_config_validation_says_how_to_fix():
    with pytest.raises(ConfigError, match="removed_ratio"):
        RocketConfig(removed_ratio=1.5)
    with pytest.raises(ConfigError, match="cost"):
        RocketConfig(cost="bogus")
    with pytest.raises(ConfigError, match="ks"):
        GridConfig(ks=(0.5,))
    grid = GridConfig.parse("removed=0.05:0.70:0.05;ks=1.0:3.0:0.1")
    assert len(grid.removed_ratios) == 14 and len(grid.ks) == 21
    cfg = RocketConfig(removed_ratio=0.2, grid=grid)
    assert RocketConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # the reference's error cap is on by default; "off" (any case) turns it off; a factor < 1 is refused
    assert cfg.alpha == "auto"
    assert RocketConfig(alpha="OFF").alpha is None and RocketConfig(alpha="1.3").alpha == 1.3
    with pytest.raises(ConfigError, match="alpha"):
        RocketConfig(alpha=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        RocketConfig(alpha="sometimes")


class _Uniform(torch.nn.Module):
    """Logits all equal: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path):
    windows = torch.randint(0, 37, (3, 16))
    result = perplexity(_Uniform(37), windows, progress=False)
    assert result.perplexity == pytest.approx(37, rel=1e-6)
    assert result.windows == 3 and result.tokens == 3 * 15
    assert perplexity(_Uniform(37), windows, limit=1, progress=False).windows == 1


def test_wikitext_rows_follow_the_dataset_convention(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n w1 w2 \n")
    assert wikitext2_rows(raw) == ["", " = Title = \n", "", " w1 w2 \n"]
    windows = token_windows(make_tiny_tokenizer(), "w1 " * 50, 16)
    assert windows.shape[1] == 16 and windows.shape[0] >= 3
