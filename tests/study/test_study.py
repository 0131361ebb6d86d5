"""rocketlm study: statistics against hand-computed cases, the divergence analysis on toy
profiles, and the whole study end to end on a tiny random model (two seeds, two ratios,
three costs, two local zero-shot tasks)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from rocketlm.allocation.plan import allocate
from rocketlm.profiling.profile import Candidate, LayerProfile
from rocketlm.monitor import StageStats
from rocketlm.study import StudyConfig, analysis, compare, figures, report, stats
from rocketlm.study.cli import add_study_parser, run_study_cli, study_config_from_args
from rocketlm.study.records import DenseRecord, Evaluation, PerplexityEval, RunRecord, ZeroShotEval
from rocketlm.study.result import StudyResult

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- statistics

def test_spearman_hand_computed():
    # x ranks 1..5; y = 5,6,7,8,7 -> ranks 1,2,3.5,5,3.5; centred: dx=(-2,-1,0,1,2), dy=(-2,-1,.5,2,.5)
    # sum dx*dy = 8, sum dx^2 = 10, sum dy^2 = 9.5 -> rho = 8 / sqrt(95)
    assert stats.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert stats.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 2, 3], [7, 7, 7]))  # constant: undefined
    assert math.isnan(stats.spearman([1], [2]))
    with pytest.raises(ValueError, match="paired"):
        stats.spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy_with_ties():
    import scipy.stats as scipy_stats
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 6, size=25)  # many ties
        y = x + rng.integers(0, 4, size=25)
        assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)


def test_mean_std_over_seeds():
    m = stats.mean_std([1.0, 2.0, 3.0])
    assert (m.mean, m.std, m.n) == (2.0, 1.0, 3)  # sample std, ddof=1
    single = stats.mean_std([4.0])
    assert single.mean == 4.0 and single.std is None
    with pytest.raises(ValueError):
        stats.mean_std([])


def test_bootstrap_hand_computed_cases():
    # every example gains exactly 1: every resample gives 1
    ci = stats.paired_bootstrap_ci([0, 0, 0, 0], [1, 1, 1, 1], n_boot=500)
    assert (ci.mean_diff, ci.low, ci.high, ci.significant) == (1.0, 1.0, 1.0, True)
    # identical runs: the interval is [0, 0], not significant
    ci = stats.paired_bootstrap_ci([0, 1, 1, 0], [0, 1, 1, 0], n_boot=500)
    assert (ci.low, ci.high, ci.significant) == (0.0, 0.0, False)
    # two examples with differences 1 and 0: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4,
    # so the 95% percentile interval is [0, 1] and it contains 0
    ci = stats.paired_bootstrap_ci([0, 0], [1, 0], n_boot=4000, seed=3)
    assert ci.mean_diff == 0.5 and (ci.low, ci.high) == (0.0, 1.0) and not ci.significant
    # the same seed gives the same interval
    assert stats.paired_bootstrap_ci([0, 0], [1, 0], n_boot=4000, seed=3) == ci


def test_bootstrap_covers_known_difference():
    rng = np.random.default_rng(7)
    n = 3000
    a = (rng.random(n) < 0.60).astype(float)
    b = (rng.random(n) < 0.70).astype(float)  # true difference +0.10
    ci = stats.paired_bootstrap_ci(a, b, n_boot=2000, seed=1)
    assert ci.low < 0.10 < ci.high
    assert ci.significant and ci.low > 0
    same = (rng.random(n) < 0.60).astype(float)  # no true difference
    ci0 = stats.paired_bootstrap_ci(a, same, n_boot=2000, seed=1)
    assert ci0.low < 0 < ci0.high and not ci0.significant


def test_bootstrap_over_seeds_and_strata():
    # seed 1 gains 0.1 on every example, seed 2 gains 0.3: resampling examples always gives 0.2
    a = np.zeros((2, 50))
    b = np.stack([np.full(50, 0.1), np.full(50, 0.3)])
    ci = stats.paired_bootstrap_ci_seeds(a, b, n_boot=500)
    assert ci.mean_diff == pytest.approx(0.2) and ci.low == pytest.approx(0.2) and ci.high == pytest.approx(0.2)
    assert ci.per_seed_diff == pytest.approx((0.1, 0.3)) and ci.n_seeds == 2
    # resampling the seeds as well: draws are 0.1, 0.2, 0.3 -> the interval spans [0.1, 0.3]
    ci = stats.paired_bootstrap_ci_seeds(a, b, n_boot=2000, resample_seeds=True)
    assert ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.3) and ci.resampled == "examples+seeds"
    # two strata (tasks) weigh equally whatever their size: (1 + 0) / 2
    ci = stats.paired_bootstrap([np.ones((1, 3)), np.zeros((1, 7))], n_boot=200)
    assert ci.mean_diff == 0.5 and ci.low == 0.5 and ci.high == 0.5 and ci.n_examples == 10
    # a known difference over seeds: two seeds, true +0.08
    rng = np.random.default_rng(11)
    A = (rng.random((2, 4000)) < 0.5).astype(float)
    B = (rng.random((2, 4000)) < 0.58).astype(float)
    ci = stats.paired_bootstrap_ci_seeds(A, B, n_boot=1000, seed=2)
    assert ci.low < 0.08 < ci.high and ci.significant
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ci_seeds(A, B[:1])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_bootstrap_ci([0], [1], confidence=1.5)


# --------------------------------------------------------------------------- divergence analysis

def _profile(name: str, errors: dict[tuple[float, float], tuple[float, float]], size: int = 100) -> LayerProfile:
    cands = [Candidate(r, ks, 1, 1, int(size * (1 - r)), int(size * (1 - r)) * 4, ew, eo)
             for (r, ks), (ew, eo) in errors.items()]
    return LayerProfile(name, 10, 10, size, size * 4, "g", cands)


def test_layer_position():
    assert analysis.layer_position("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert analysis.layer_position("transformer.h.12.mlp.c_fc") == (12, "mlp.c_fc")
    assert analysis.layer_position("lm_head") == (None, "lm_head")


def test_best_ks_disagreement_and_correlation():
    # ratio 0.2: weight prefers ks=1, output prefers ks=2; ratio 0.5: both prefer ks=2; ratio 0.7: one ks only
    p = _profile("model.layers.0.mlp.up_proj", {(0.2, 1.0): (0.10, 0.30), (0.2, 2.0): (0.20, 0.25),
                                                (0.5, 1.0): (0.40, 0.60), (0.5, 2.0): (0.35, 0.50),
                                                (0.7, 1.0): (0.70, 0.80)})
    d = analysis.best_ks_disagreement([p], "weight", "output")
    assert (d.n_pairs, d.n_differ) == (3, 1) and d.share == pytest.approx(1 / 3)
    assert d.n_pairs_with_choice == 2 and d.share_with_choice == pytest.approx(0.5)
    rows = analysis.error_correlations([p])
    ew = [0.10, 0.20, 0.40, 0.35, 0.70]
    eo = [0.30, 0.25, 0.60, 0.50, 0.80]
    assert rows[0].spearman == pytest.approx(stats.spearman(ew, eo)) and rows[0].n_candidates == 5
    summary = analysis.correlation_summary(rows + [analysis.LayerCorrelation("x", 1.0, 3)])
    assert summary.n_above == 1 and summary.share_above == 0.5 and summary.max == 1.0
    empty = analysis.correlation_summary([analysis.LayerCorrelation("x", None, 1)])
    assert empty.n_defined == 0 and empty.median is None and empty.to_json()["n_layers"] == 1


def test_allocation_difference_and_sweep():
    # layer a: weight error favours compressing it, output error favours layer b
    a = _profile("model.layers.0.mlp.up_proj", {(0.5, 1.0): (0.1, 0.9)})
    b = _profile("model.layers.0.mlp.down_proj", {(0.5, 1.0): (0.9, 0.1)})
    aw, ao = allocate([a, b], 0.25, "weight", alpha=None), allocate([a, b], 0.25, "output", alpha=None)
    diff = analysis.allocation_difference(aw, ao)
    assert diff.n_layers == 2 and diff.n_differ == 2 and diff.n_differ_ratio == 2
    assert diff.mean_abs_kept_diff == pytest.approx(0.5)
    assert {x.name for x in diff.layers} == {a.name, b.name}
    assert analysis.allocation_difference(aw, aw).n_differ == 0
    sweep = analysis.allocation_sweep([a, b], [0.25, 0.5, 0.9], ["weight", "output", "blend"])
    assert [pt.ratio for pt in sweep] == [0.25, 0.5, 0.9]
    assert sweep[0].pairs[("weight", "output")].n_differ == 2
    assert sweep[1].pairs[("weight", "output")].n_differ == 0  # both layers must be compressed
    assert "weight" in sweep[2].infeasible and sweep[2].pairs == {} and sweep[2].costs == {}
    # the JSON form keeps the study.json layout: "a|b" pair keys, infeasible costs inside "costs"
    point = sweep[2].to_json()
    assert "infeasible" in point["costs"]["weight"] and point["pairs"] == {}
    assert "layers" not in sweep[0].to_json()["pairs"]["weight|output"]


def test_blend_cost_is_registered():
    from rocketlm.allocation.costs import available_costs, get_cost
    from rocketlm.config import RocketConfig
    assert {"weight", "output", "blend"} <= set(available_costs())
    cand = Candidate(0.5, 1.0, 1, 1, 50, 200, 0.2, 0.6)
    assert get_cost("blend").fn(None, cand) == pytest.approx(0.4)
    assert RocketConfig(cost="blend").cost == "blend"


# --------------------------------------------------------------------------- report from typed records

STUDY_COSTS = ("weight", "output")
STUDY_SEEDS = (1, 2)
STUDY_RATIOS = (0.2, 0.5)


def _toy_profiles(seed: int = 0) -> list[LayerProfile]:
    """Two decoder blocks x two projections, every removed ratio x ks with random (weight, output) errors."""
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{b}.{proj}" for b in range(2) for proj in ("mlp.up_proj", "self_attn.q_proj")]
    return [_profile(name, {(r, ks): (float(rng.random()) * r, float(rng.random()) * r)
                            for r in (0.2, 0.4, 0.6) for ks in (1.0, 2.0)}) for name in names]


def _toy_zeroshot(correct: dict[str, list[int]]) -> ZeroShotEval:
    tasks = {t: {"acc": float(np.mean(v)), "n": len(v), "per_example": {"doc_id": list(range(len(v))), "acc": v}}
             for t, v in correct.items()}
    tasks["arc_easy"]["note"] = "toy documents"
    average = {"metric": "acc", "value": float(np.mean([e["acc"] for e in tasks.values()])), "tasks": list(tasks)}
    return ZeroShotEval.from_json({"tasks": tasks, "unavailable": {"race": "no local copy"}, "average": average})


def _toy_evaluation(ppl: float, unit_nll: tuple[float, ...], correct: dict[str, list[int]]) -> Evaluation:
    return Evaluation(ppl=PerplexityEval(perplexity=ppl, mean_nll=math.log(ppl), windows=len(unit_nll),
                                         total_windows=len(unit_nll), seq_len=8, tokens=8 * len(unit_nll),
                                         seconds=0.1, unit_windows=1, unit_nll=unit_nll),
                      zeroshot=_toy_zeroshot(correct), perplexity_seconds=0.1, zeroshot_seconds=0.2)


def _toy_run(profiles: list[LayerProfile], seed: int, ratio: float, cost: str) -> RunRecord:
    worse = 0.3 if cost == "output" else 0.0  # output: higher NLL on every window, more piqa examples right
    unit_nll = tuple(2.0 + ratio + worse + 0.01 * i for i in range(4))
    correct = {"piqa": [1, 1, 1, 0, 1, 1, 1, 1] if cost == "output" else [1, 0, 1, 0, 1, 0, 1, 0],
               "arc_easy": [1, 0, 0, 1, 0, 0, 1, seed % 2]}
    stages = {name: StageStats(name, seconds=0.5) for name in ("calibration", "profiling", "allocation", "compression")}
    return RunRecord(spec={}, seed=seed, ratio=ratio, cost=cost,
                     allocation=allocate(profiles, ratio, cost, alpha=None), stages=stages, keys=None, checks={},
                     evaluation=_toy_evaluation(math.exp(np.mean(unit_nll)), unit_nll, correct), wall_seconds=1.0)


def _toy_study(tmp_path) -> tuple[StudyResult, list[LayerProfile]]:
    """A StudyResult assembled from typed records built here (no model): the report's and figures' only input."""
    profiles = _toy_profiles()
    config = StudyConfig(model="toy", out=str(tmp_path), ratios=STUDY_RATIOS, costs=STUDY_COSTS, seeds=STUDY_SEEDS,
                         tasks="piqa,arc_easy", sweep_ratios=(0.3, 0.9), n_boot=200)
    runs = [_toy_run(profiles, seed, ratio, cost)
            for seed in STUDY_SEEDS for ratio in STUDY_RATIOS for cost in STUDY_COSTS]
    dense = DenseRecord(spec={}, model="toy", evaluation=_toy_evaluation(
        7.0, (1.9,) * 4, {"piqa": [1] * 8, "arc_easy": [1, 1, 0, 1, 1, 1, 1, 1]}), wall_seconds=1.0)
    divergence = {seed: analysis.divergence_analysis(
        profiles, {ratio: {r.cost: r.allocation for r in runs if r.seed == seed and r.ratio == ratio}
                   for ratio in STUDY_RATIOS}, STUDY_COSTS) for seed in STUDY_SEEDS}
    sweep = {seed: analysis.allocation_sweep(profiles, config.sweep_ratios, STUDY_COSTS) for seed in STUDY_SEEDS}
    study = StudyResult(
        config=config, cost_descriptions={"weight": "weight-space error", "output": "output-space error"},
        reference_cost=compare.reference_cost(STUDY_COSTS), dense=dense, runs=runs,
        layers=[p.name for p in profiles], main_table=compare.main_table(runs, dense, STUDY_COSTS),
        statistics=compare.paired_statistics(runs, STUDY_COSTS, n_boot=200), divergence=divergence, sweep=sweep,
        runtime=compare.runtime_summary(runs, STUDY_COSTS, sweep))
    return study, profiles


def test_report_renders_from_typed_records(tmp_path):
    """The report and the figures read the compare / analysis records by attribute: renaming a field of
    one of them without following it in report.py or figures.py fails here, without any model."""
    study, profiles = _toy_study(tmp_path)
    entry = study.statistics[0.5][("weight", "output")]
    assert set(entry.tasks) == {"piqa", "arc_easy"} and entry.average_tasks == ("piqa", "arc_easy")
    assert entry.tasks["piqa"].mean_diff == pytest.approx(3 / 8)  # 7/8 right under output vs 4/8 under weight
    assert entry.perplexity.ratio_ci.ratio == pytest.approx(math.exp(0.3)) and entry.perplexity.ratio_ci.significant
    study.figures = figures.make_figures(study, profiles, tmp_path / "figures")
    study.paper_comparison = report.paper_comparison(study)
    text = report.render_report(study)
    row = study.main_table.row(0.5, "output")
    assert f"| 0.5 | output | {100 * row.achieved_removed_ratio.mean:.2f}" in text
    assert "| piqa | 50.00 ± 0.00 | 87.50 ± 0.00 | +37.50 |" in text and "**average**" in text
    assert "\\* arc_easy: toy documents" in text and "Not evaluated: race (no local copy)" in text
    assert f"{math.exp(0.3):.4f}" in text and "(worse under output)" in text
    assert "| 0.9 | infeasible |" in text and "weight vs output" in text
    assert "Lowest correlations (seed 1)" in text and "seed 1: calibration 0.50 s" in text
    for rel in study.figures.values():
        assert (tmp_path / rel).read_bytes()[:8] == PNG_MAGIC and f"]({rel})" in text
    claims = {c.claim: c for c in study.paper_comparison}
    high = claims["output cost raises average accuracy under aggressive compression (removed 0.5 here)"]
    assert high.study.startswith(f"{100 * entry.average.mean_diff:+.2f} pp") and high.verdict
    assert report.format_main_table(study) in text
    # study.json is the records' JSON form: "a|b" pair keys, ratio keys as in the report
    data = json.loads(json.dumps(study.to_json()))
    assert data["statistics"]["0.5"]["weight|output"]["average"]["tasks"] == ["piqa", "arc_easy"]
    assert data["divergence"]["1"]["allocation_differences"]["0.5"]["weight|output"]["n_layers"] == 4
    assert "per_example" not in data["runs"][0]["zeroshot"]["tasks"]["piqa"] and "spec" not in data["runs"][0]
    assert data["runs"][0]["file"] == f"runs/{study.runs[0].name}.json"


def test_cli_defaults_come_from_study_config(tmp_path):
    parser = argparse.ArgumentParser(prog="rocketlm")
    add_study_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["study", "m", "--out", str(tmp_path)])
    assert study_config_from_args(args) == StudyConfig(model="m", out=str(tmp_path))
    help_text = parser._subparsers._group_actions[0].choices["study"].format_help()
    assert "[0.1:0.6:0.05]" in help_text and "[2023,42]" in help_text and "[weight,output,blend]" in help_text
    args = parser.parse_args(["study", "m", "--out", str(tmp_path), "--sweep-ratios", "0.1:0.3:0.1",
                              "--calib-samples", "4", "--alpha", "off", "--ratios", "0.5,0.2"])
    config = study_config_from_args(args)
    assert config.sweep_ratios == (0.1, 0.2, 0.3) and config.ratios == (0.2, 0.5)
    assert config.rocket.calib_samples == 4 and config.rocket.alpha is None
    assert config.rocket.calib_seq_len == StudyConfig(model="m", out="o").rocket.calib_seq_len
    from rocketlm.errors import ConfigError
    with pytest.raises(ConfigError, match="--ratios"):
        study_config_from_args(parser.parse_args(["study", "m", "--out", "o", "--ratios", "0.2,x"]))


# --------------------------------------------------------------------------- end to end

WORDS = [f"w{i}" for i in range(400)]


def _sentence(i: int, n: int = 8) -> str:
    return " ".join(WORDS[(i * 7 + j * 13) % 400] for j in range(n))


def _write_zeroshot(root) -> None:
    """Two local tasks in the official file layouts, with word-level text the tiny tokenizer knows."""
    piqa = root / "zeroshot" / "piqa"
    piqa.mkdir(parents=True)
    (piqa / "valid.jsonl").write_text("".join(
        json.dumps({"goal": _sentence(i, 6), "sol1": _sentence(i + 1, 5), "sol2": _sentence(i + 2, 5)}) + "\n"
        for i in range(12)))
    (piqa / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(12)))
    arc = root / "zeroshot" / "arc"
    arc.mkdir(parents=True)
    (arc / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps({
        "id": f"q{i}", "question": {"stem": _sentence(i, 6), "choices": [
            {"text": _sentence(i + k, 3), "label": "ABCD"[k]} for k in range(4)]},
        "answerKey": "ABCD"[i % 4]}) + "\n" for i in range(12)))


@pytest.fixture
def study_inputs(tmp_path):
    model_dir = tmp_path / "tiny-model"
    make_tiny_model("qwen3").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data"
    (data / "calib").mkdir(parents=True)
    (data / "calib" / "a.txt").write_text(" ".join(f"w{(i * 13) % 400}" for i in range(5000)))
    (data / "wikitext-2-raw").mkdir()
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(
        "\n".join(" ".join(f"w{(i * j) % 400}" for j in range(30)) for i in range(40)))
    _write_zeroshot(data)
    return model_dir, data


def _study_args(model_dir, data, out, cache, tasks):
    parser = argparse.ArgumentParser(prog="rocketlm")
    add_study_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([
        "study", str(model_dir), "--ratios", "0.2,0.5", "--seeds", "2023,42", "--costs", "weight,output,blend",
        "--tasks", tasks, "--limit", "8", "--grid", "removed=0.1:0.7:0.2;ks=1,2,3", "--calib-samples", "6",
        "--seq-len", "32", "--ppl-seq-len", "32", "--ppl-limit", "6", "--sweep-ratios", "0.1:0.6:0.1",
        "--n-boot", "300", "--batch-size", "8", "--data", str(data), "--cache-dir", str(cache),
        "--out", str(out), "-q"])


def _check_runs(study: dict, out) -> None:
    """Every (seed, ratio, cost) ran and was saved on its own, one profiling pass per seed."""
    assert len(study["runs"]) == 2 * 2 * 3
    assert len(list((out / "runs").glob("seed*.json"))) == 12 and (out / "runs" / "dense.json").is_file()
    assert not list((out / "runs").glob("*.sqlite*"))  # request caches go once their run is recorded
    assert {(r["seed"], r["ratio"], r["cost"]) for r in study["runs"]} == {
        (s, r, c) for s in (2023, 42) for r in (0.2, 0.5) for c in ("weight", "output", "blend")}
    for r in study["runs"]:
        assert r["allocation"]["achieved_removed_ratio"] >= r["ratio"] - 1e-9
    # later runs of a seed reuse its cached profiles
    for seed in (2023, 42):
        keys = {r["keys"]["profile"] for r in study["runs"] if r["seed"] == seed}
        assert len(keys) == 1
    assert len({r["keys"]["profile"] for r in study["runs"]}) == 2


def _check_tables(study: dict, report: str) -> None:
    """Main table (dense on top, then every ratio x cost) and the statistics against weight."""
    rows = study["main_table"]["rows"]
    assert [(r["ratio"], r["cost"]) for r in rows] == [(0.2, c) for c in ("weight", "output", "blend")] + \
        [(0.5, c) for c in ("weight", "output", "blend")]
    assert all(r["n_seeds"] == 2 and r["ppl"]["std"] is not None for r in rows)
    assert "| 0 (dense) |" in report
    for ratio in ("0.2", "0.5"):
        for cost in ("weight", "output", "blend"):
            assert f"| {ratio} | {cost} |" in report
    st = study["statistics"]
    assert set(st) == {"0.2", "0.5"} and set(st["0.5"]) == {"weight|output", "weight|blend"}
    ppl = st["0.5"]["weight|output"]["perplexity"]
    assert ppl["diff"]["n"] == 2 and ppl["ratio_ci"]["low"] <= ppl["ratio_ci"]["high"]
    assert ppl["ratio_ci"]["n_units"] == 6
    assert "significant" in report
    if HAS_LM_EVAL:
        entry = st["0.5"]["weight|output"]
        assert set(entry["tasks"]) == {"piqa", "arc_easy"}
        avg = entry["average"]
        assert avg["n_seeds"] == 2 and avg["n_examples"] == 16 and avg["low"] <= avg["mean_diff"] <= avg["high"]
        assert "piqa" in report and "arc_easy" in report and "**average**" in report


def _check_analysis(study: dict, report: str) -> None:
    """Divergence analysis, sweep, runtime and the paper comparison."""
    div = study["divergence"]["2023"]
    assert div["correlation_summary"]["n_defined"] == div["n_layers"] == 14  # 2 blocks x 7 linears
    assert set(div["best_ks"]) == {"weight|output", "weight|blend", "output|blend"}
    assert 0.0 <= div["best_ks"]["weight|output"]["share"] <= 1.0
    assert div["allocation_differences"]["0.5"]["weight|output"]["n_layers"] == 14
    sweep = study["sweep"]["42"]
    assert [pt["ratio"] for pt in sweep] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert "weight|output" in sweep[0]["pairs"]
    for heading in ("## 1. Main results", "## 2. Statistics", "## 3. Why the costs agree", "## 4. Figures",
                    "## 5. Runtime", "## 6. Comparison with the ActCost paper"):
        assert heading in report
    rt = study["runtime"]
    assert set(rt["per_cost"]) == {"weight", "output", "blend"} and set(rt["profiling_per_seed"]) == {"2023", "42"}
    assert all(v["profiling_seconds"] > 0 for v in rt["profiling_per_seed"].values())
    claims = {row["claim"]: row for row in study["paper_comparison"]}
    assert any("Spearman" in c for c in claims) and any("best ks" in c for c in claims)
    assert all(row["verdict"] for row in study["paper_comparison"])


def _check_figures(study: dict, report: str, out) -> None:
    """Every figure exists, is a PNG, and is linked from the report."""
    figure_paths = study["figures"]
    expected = {"heatmap_0p20", "heatmap_0p50", "kept_per_layer_0p20", "kept_per_layer_0p50", "error_scatter",
                "spearman_hist", "metrics_vs_ratio", "divergence_sweep"}
    assert set(figure_paths) == expected
    for rel in figure_paths.values():
        path = out / rel
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
        assert f"]({rel})" in report


def test_study_end_to_end(study_inputs, tmp_path, capsys, monkeypatch):
    model_dir, data = study_inputs
    out, cache = tmp_path / "study", tmp_path / "cache"
    tasks = "piqa,arc_easy" if HAS_LM_EVAL else "none"
    args = _study_args(model_dir, data, out, cache, tasks)
    assert args.command == "study"
    assert run_study_cli(args) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "| 0.5 | output |" in printed

    study = json.loads((out / "study.json").read_text())
    report_text = (out / "report.md").read_text()
    _check_runs(study, out)
    _check_tables(study, report_text)
    _check_analysis(study, report_text)
    _check_figures(study, report_text, out)

    # resume: every run (and the dense baseline) is read back, nothing is compressed again
    def no_compress(*a, **k):
        raise AssertionError("a finished run was recomputed")
    monkeypatch.setattr("rocketlm.study.runner.compress", no_compress)
    monkeypatch.setattr("rocketlm.models.loading.load_model", no_compress)
    (out / "report.md").unlink()
    assert run_study_cli(args) == 0
    again = json.loads((out / "study.json").read_text())
    assert again["main_table"] == study["main_table"] and again["statistics"] == study["statistics"]
    assert (out / "report.md").is_file()


def test_study_perplexity_only_single_seed(study_inputs, tmp_path):
    """The Python API with --tasks none and one seed: no spread, no accuracy, and the report says so."""
    from rocketlm.config import GridConfig, RocketConfig
    from rocketlm.study import StudyConfig, run_study
    model_dir, data = study_inputs
    out = tmp_path / "ppl-only"
    config = StudyConfig(model=str(model_dir), out=str(out), ratios=(0.3,), costs=("output", "weight"), seeds=(7,),
                         tasks="none", sweep_ratios=(0.2, 0.4), ppl_seq_len=32, ppl_limit=4, ppl_batch_size=2,
                         data_dir=str(data), cache_dir=str(tmp_path / "cache"), n_boot=200,
                         rocket=RocketConfig(calib_samples=4, calib_seq_len=32,
                                             grid=GridConfig(removed_ratios=(0.2, 0.4, 0.6), ks=(1.0, 2.0))))
    study = run_study(config, progress=False)
    assert study.reference_cost == "weight"
    assert [r.cost for r in study.main_table.rows] == ["output", "weight"]
    row = study.main_table.rows[0]
    assert row.acc is None and row.ppl.std is None and row.ppl.n == 1
    entry = study.statistics[0.3][("weight", "output")]
    assert entry.tasks == {} and entry.average is None
    assert entry.perplexity.ratio_ci.n_units == 2  # 4 windows in batches of 2
    report = (out / "report.md").read_text()
    assert "not measured (`--tasks none`)" in report and "| 0.3 | output |" in report
    assert "metrics_vs_ratio" in study.figures and (out / study.figures["metrics_vs_ratio"]).is_file()
    assert study.paper_comparison[0].verdict == "not measured"
    # the resume files read back into the same records
    for run in study.runs:
        on_disk = json.loads((out / "runs" / f"{run.name}.json").read_text())
        assert RunRecord.from_json(on_disk) == run
        assert RunRecord.from_json(run.to_json()) == run
    assert DenseRecord.from_json(json.loads((out / "runs" / "dense.json").read_text())) == study.dense


def test_study_config_errors(tmp_path):
    from rocketlm.config import ConfigError
    from rocketlm.study import StudyConfig
    with pytest.raises(ConfigError, match="outside"):
        StudyConfig(model="m", out=str(tmp_path), ratios=(1.5,))
    with pytest.raises(ConfigError, match="costs"):
        StudyConfig(model="m", out=str(tmp_path), costs=("weight", "nosuchcost"))
    with pytest.raises(ConfigError, match="tasks"):
        StudyConfig(model="m", out=str(tmp_path), tasks="nosuchtask")
    assert StudyConfig(model="m", out=str(tmp_path), tasks="none").task_names == []


def test_missing_inputs_fail_before_any_model_work(tmp_path):
    from rocketlm.calibration.data import DataError
    from rocketlm.study import StudyConfig, run_study
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    config = StudyConfig(model=str(tmp_path / "no-model"), out=str(tmp_path / "o"), data_dir=str(data), tasks="none")
    with pytest.raises(DataError, match="wiki.test.raw"):
        run_study(config)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("w1 w2")
    if HAS_LM_EVAL:
        (data / "zeroshot" / "piqa").mkdir(parents=True)
        with pytest.raises(DataError, match="piqa"):
            run_study(dataclasses.replace(config, tasks="piqa"))
    assert not (tmp_path / "o").exists()
