"""Zero-shot suite (rocketlm.evaluation.zeroshot): parsers, task definitions, lm-eval runs.

Data: ``$ROCKETLM_DATA`` or ``../shared/data`` beside the repository; the data-dependent
tests skip with a reason when it is absent.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'rocketlm[eval]')")

from rocketlm.evaluation import zeroshot as zs  # noqa: E402
from rocketlm.evaluation.zeroshot import data as zdata  # noqa: E402
from rocketlm.evaluation.zeroshot import tasks as ztasks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ROCKETLM_DATA") or REPO.parent / "shared" / "data")
HAS_DATA = (DATA / "zeroshot").is_dir()
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"zero-shot data not found at {DATA / 'zeroshot'} "
                                                     f"(set ROCKETLM_DATA to the shared data directory)")
LOCAL = [t for t in zs.ALL_TASKS if ztasks.TASKS[t].local]
LIMIT = 5


# --------------------------------------------------------------------------- task names

def test_task_groups():
    assert zs.PAPER_TASKS == ("piqa", "hellaswag", "lambada_openai", "arc_easy", "arc_challenge",
                              "sciq", "race", "mmlu")
    assert zs.ALL_TASKS == zs.PAPER_TASKS + ("winogrande", "boolq")
    assert zs.resolve_tasks("paper") == list(zs.PAPER_TASKS)
    assert zs.resolve_tasks("all") == list(zs.ALL_TASKS)
    assert zs.resolve_tasks(" PIQA, arc-e,lambada ,piqa") == ["piqa", "arc_easy", "lambada_openai"]
    assert zs.resolve_tasks("paper,boolq")[-1] == "boolq"


@pytest.mark.parametrize("spec", ["piqa,nosuchtask", "mmlu_pro", "", " , "])
def test_resolve_tasks_errors(spec):
    with pytest.raises(ValueError) as exc:
        zs.resolve_tasks(spec)
    msg = str(exc.value)
    assert "piqa" in msg and "paper" in msg and "all" in msg  # lists what is valid
    if "nosuchtask" in spec:
        assert "'nosuchtask'" in msg


# --------------------------------------------------------------------------- parsers

@needs_data
@pytest.mark.parametrize("task", LOCAL)
def test_parser_counts(task):
    docs = zdata.LOADERS[task](DATA)
    assert len(docs) == zdata.EXPECTED_COUNTS[task]
    # the zeroshot directory itself is accepted too
    assert len(zdata.LOADERS[task](DATA / "zeroshot")) == len(docs)


def test_published_counts():
    assert zdata.EXPECTED_COUNTS == {"piqa": 1838, "hellaswag": 10042, "lambada_openai": 5153,
                                     "arc_easy": 2376, "arc_challenge": 1172, "sciq": 1000,
                                     "mmlu": 14042, "winogrande": 1267, "boolq": 3270}


@needs_data
def test_parsed_fields():
    piqa = zs.load_piqa(DATA)
    assert {d["label"] for d in piqa} == {0, 1}
    hs = zs.load_hellaswag(DATA)
    assert all(len(d["endings"]) == 4 and d["label"] in "0123" for d in hs)
    assert hs[0]["activity_label"] == "Roof shingle removal"
    arc = zs.load_arc_challenge(DATA)
    assert all(d["answerKey"] in d["choices"]["label"] for d in arc)
    mmlu = zs.load_mmlu(DATA)
    assert len({d["subject"] for d in mmlu}) == 57
    assert {d["answer"] for d in mmlu} == {0, 1, 2, 3} and all(len(d["choices"]) == 4 for d in mmlu)
    wg = zs.load_winogrande(DATA)
    assert {d["answer"] for d in wg} == {"1", "2"}
    bq = zs.load_boolq(DATA)
    assert {d["label"] for d in bq} == {0, 1}
    assert not any(d["question"].endswith("?") or d["passage"].startswith("Passage:") for d in bq)
    lam = zs.load_lambada_openai(DATA)
    assert all(" " in d["text"] for d in lam)


def test_missing_data_file(tmp_path):
    (tmp_path / "zeroshot" / "piqa").mkdir(parents=True)
    (tmp_path / "zeroshot" / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(zs.MissingDataError) as exc:
        zs.load_piqa(tmp_path)
    msg = str(exc.value)
    assert "valid-labels.lst" in msg and "piqa" in msg and "--data" in msg
    with pytest.raises(FileNotFoundError, match="mmlu"):  # MissingDataError is a FileNotFoundError
        zs.load_mmlu(tmp_path)
    # evaluate_zeroshot checks every requested task's files before touching the model
    with pytest.raises(zs.MissingDataError, match="boolq"):
        zs.evaluate_zeroshot(object(), object(), ["boolq"], data_dir=str(tmp_path))


def test_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ROCKETLM_DATA", raising=False)
    with pytest.raises(zs.MissingDataError, match="ROCKETLM_DATA"):
        zs.evaluate_zeroshot(object(), object(), "piqa")
    with pytest.raises(zs.MissingDataError, match="does not exist"):
        zs.evaluate_zeroshot(object(), object(), "piqa", data_dir=str(tmp_path / "nope"))
    with pytest.raises(zs.MissingDataError, match="zeroshot"):
        zs.resolve_data_dir(tmp_path)  # exists but has no zeroshot/ layout


def test_only_race_is_an_error(tmp_path):
    (tmp_path / "zeroshot" / "piqa").mkdir(parents=True)
    with pytest.raises(zs.MissingDataError, match="RACE"):
        zs.evaluate_zeroshot(object(), object(), "race", data_dir=str(tmp_path))


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        zs.evaluate_zeroshot(object(), object(), "piqa", data_dir="/nonexistent", limit=limit)


# --------------------------------------------------------------------------- prompts = standard lm-eval prompts

def _standard_task(yaml_rel: str, split_docs: dict[str, list[dict]], **over):
    """The installed lm-eval's own YAML task, fed with the given documents."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # pragma: no cover - other lm-eval versions
        pytest.skip("this lm-eval version has no lm_eval.tasks._yaml_loader.load_yaml")
    path = Path(lm_eval.__file__).parent / "tasks" / yaml_rel
    if not path.exists():
        pytest.skip(f"installed lm-eval has no {yaml_rel}")
    cfg = load_yaml(path, resolve_func=True)
    for k in ("tag", "group", "include"):
        cfg.pop(k, None)
    cfg.update(over)
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) not in split_docs:  # only the splits we have
            cfg[key] = None
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in split_docs.items()})
    task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=0)
    return task


def _requests(task, n=12):
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.request_type, i.args) for i in task.instances]


def _metric_setup(task):
    return ({k: getattr(v, "__name__", v) for k, v in task._aggregation_list.items()}, dict(task._higher_is_better))


@needs_data
@pytest.mark.parametrize("task", [t for t in LOCAL if t != "mmlu"])
def test_prompts_match_installed_lm_eval(task):
    spec = ztasks.TASKS[task]
    docs = zdata.LOADERS[task](DATA)[:40]
    ours = ztasks.make_local_task(task, docs)
    std = _standard_task(spec.standard_yaml, {spec.split: docs})
    assert _requests(ours) == _requests(std)
    assert _metric_setup(ours) == _metric_setup(std)
    assert ours.OUTPUT_TYPE == std.OUTPUT_TYPE


@needs_data
def test_mmlu_prompts_match_installed_lm_eval():
    docs = zdata.load_mmlu(DATA)
    dev = zdata.load_mmlu(DATA, split="dev")
    built = ztasks.build_local("mmlu", docs)
    assert len(built["tasks"]) == 57 and set(built["groups"]) == {
        "mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"}
    for subject in ("abstract_algebra", "high_school_us_history"):
        sub = [d for d in docs if d["subject"] == subject]
        std = _standard_task(f"mmlu/default/mmlu_{subject}.yaml",
                             {"test": sub, "dev": [d for d in dev if d["subject"] == subject]})
        ours = built["tasks"][f"mmlu_{subject}"]
        assert _requests(ours, 5) == _requests(std, 5)
        assert _metric_setup(ours) == _metric_setup(std)


# --------------------------------------------------------------------------- runs on a tiny random model

@pytest.fixture(scope="module")
def tiny_all_result():
    if not HAS_DATA:
        pytest.skip(f"zero-shot data not found at {DATA / 'zeroshot'}")
    model = make_tiny_model("llama")
    return zs.evaluate_zeroshot(model, make_tiny_tokenizer(), "all", data_dir=str(DATA), limit=LIMIT,
                                batch_size=16, progress=False, model_info={"removed_ratio": 0.0})


@needs_data
@pytest.mark.parametrize("task", LOCAL)
def test_local_task_runs_tiny_model(tiny_all_result, task):
    e = tiny_all_result["tasks"][task]
    spec = ztasks.TASKS[task]
    expected_n = LIMIT * 57 if task == "mmlu" else LIMIT
    assert e["n"] == expected_n and e["n_total"] == zdata.EXPECTED_COUNTS[task]
    assert 0.0 <= e["acc"] <= 1.0 and e["acc_stderr"] is not None and e["acc_stderr"] >= 0
    if "acc_norm" in spec.metrics:
        assert 0.0 <= e["acc_norm"] <= 1.0
    else:
        assert "acc_norm" not in e
    if task == "lambada_openai":
        assert e["perplexity"] >= 1.0 and math.isfinite(e["perplexity"])
        assert len(e["per_example"]["loglikelihood"]) == expected_n
    per = e["per_example"]
    assert len(per["doc_id"]) == len(per["acc"]) == expected_n
    assert set(per["acc"]) <= {0, 1} and abs(sum(per["acc"]) / expected_n - e["acc"]) < 1e-9
    if task != "mmlu":
        assert per["doc_id"] == list(range(LIMIT))
    assert e["wall_time_s"] > 0
    assert bool(e["note"]) == (task in ("hellaswag", "boolq"))


@needs_data
def test_result_structure(tiny_all_result):
    r = tiny_all_result
    assert list(r["tasks"]) == [t for t in zs.ALL_TASKS if t != "race"]
    assert set(r["unavailable"]) == {"race"} and "RACE" in r["unavailable"]["race"]
    avg = r["average"]
    assert avg["metric"] == "acc" and avg["tasks"] == list(r["tasks"])
    assert avg["value"] == pytest.approx(sum(r["tasks"][t]["acc"] for t in avg["tasks"]) / 9)
    assert 0 <= avg["alternatives"]["acc_norm_else_acc"] <= 1
    mmlu = r["tasks"]["mmlu"]
    assert len(mmlu["subtasks"]) == 57 and set(mmlu["groups"]) == {"stem", "other", "social_sciences", "humanities"}
    # lm-eval's MMLU aggregate = size-weighted mean of the subjects = mean over all documents
    assert mmlu["acc"] == pytest.approx(sum(mmlu["per_example"]["acc"]) / mmlu["n"])
    assert r["limit"] == LIMIT and r["config"]["limit"] == LIMIT
    assert r["model"]["removed_ratio"] == 0.0 and r["model"]["n_parameters"] > 0
    assert r["versions"]["lm_eval"] and r["versions"]["torch"]
    assert set(r["config"]["task_definitions"]) == set(r["tasks"])
    json.dumps(r)  # JSON-serialisable as is

    table = zs.format_table(r)
    for t in r["tasks"]:
        assert t in table
    assert "hellaswag*" in table and "unavailable" in table and "average (9 tasks)" in table
    assert f"{avg['value']:.4f}" in table


@needs_data
def test_save_json(tiny_all_result, tmp_path):
    p = zs.save_json(tiny_all_result, tmp_path / "sub" / "r.json")
    back = json.loads(p.read_text())
    assert back["average"]["value"] == pytest.approx(tiny_all_result["average"]["value"])
    p2 = zs.save_json(tiny_all_result, tmp_path / "r2.json", per_example=False)
    assert "per_example" not in json.loads(p2.read_text())["tasks"]["piqa"]


class _Factored(torch.nn.Module):
    """A stand-in for a compact compressed module: W ~= B @ A (rank r), never densified."""

    def __init__(self, lin: torch.nn.Linear, rank: int | None = None):
        super().__init__()
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        r = rank or s.numel()
        self.b = torch.nn.Parameter(u[:, :r] * s[:r])
        self.a = torch.nn.Parameter(vh[:r].clone())
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        y = (x @ self.a.T) @ self.b.T
        return y if self.bias is None else y + self.bias


def _factorize(model, rank=None):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _Factored(child, rank))
    return model


@needs_data
def test_custom_modules_evaluated_in_memory():
    tok = make_tiny_tokenizer()
    kw = dict(data_dir=str(DATA), limit=LIMIT, progress=False)
    dense = zs.evaluate_zeroshot(make_tiny_model("llama"), tok, ["lambada_openai"], **kw)
    full = _factorize(make_tiny_model("llama"))
    low = _factorize(make_tiny_model("llama"), rank=4)
    r_full = zs.evaluate_zeroshot(full, tok, ["lambada_openai"], **kw)
    r_low = zs.evaluate_zeroshot(low, tok, ["lambada_openai"], device="cpu", **kw)
    ll = lambda r: r["tasks"]["lambada_openai"]["per_example"]["loglikelihood"]  # noqa: E731
    assert ll(r_full) == pytest.approx(ll(dense), abs=1e-3)  # same function, other modules
    assert ll(r_low) != pytest.approx(ll(dense), abs=1e-3)  # the compact modules are what runs
    assert isinstance(low.model.layers[0].mlp.down_proj, _Factored)  # untouched, still compact
    assert r_low["model"]["n_parameters"] < dense["model"]["n_parameters"]


def test_hub_mode_fails_clearly_offline():
    code = ("from rocketlm.evaluation.zeroshot.tasks import build_hub\n"
            "try:\n    build_hub('piqa')\n    print('LOADED')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    if "LOADED" in out.stdout:
        pytest.skip("the standard piqa dataset is in the local HF cache, so hub mode works offline here")
    assert "ERR could not load the standard lm-eval task 'piqa'" in out.stdout, out.stdout + out.stderr
    assert "--data" in out.stdout


@needs_data
def test_request_cache_resumes_without_the_model_and_is_per_model(tmp_path):
    tok = make_tiny_tokenizer()
    cache = tmp_path / "eval.requests.sqlite"
    kw = dict(data_dir=str(DATA), limit=3, progress=False, request_cache=cache)
    model = make_tiny_model("llama", seed=0)
    first = zs.evaluate_zeroshot(model, tok, ["piqa", "lambada_openai"], **kw)
    assert cache.exists()

    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    second = zs.evaluate_zeroshot(model, tok, ["piqa", "lambada_openai"], **kw)  # as after an interruption
    hook.remove()
    assert calls == []  # every answer came from the cache
    for task in ("piqa", "lambada_openai"):
        assert second["tasks"][task]["per_example"] == first["tasks"][task]["per_example"]

    other = make_tiny_model("llama", seed=1)  # another model must never reuse these answers
    calls = []
    other.register_forward_pre_hook(lambda *a: calls.append(1))
    third = zs.evaluate_zeroshot(other, tok, ["lambada_openai"], **kw)
    assert calls and third["tasks"]["lambada_openai"]["per_example"] != first["tasks"]["lambada_openai"]["per_example"]


@needs_data
def test_cli_eval_writes_json_and_cleans_its_request_cache(tmp_path, capsys):
    from rocketlm.cli import main

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "eval" / "result.json"
    assert main(["eval", str(model_dir), "--tasks", "piqa,race", "--limit", "3", "--data", str(DATA),
                 "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "unavailable" in printed and "average" in printed
    result = json.loads(out.read_text())
    assert result["tasks"]["piqa"]["n"] == 3 and "race" in result["unavailable"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]  # no request cache left behind
    assert main(["eval", str(model_dir), "--tasks", "nosuchtask"]) == 2
