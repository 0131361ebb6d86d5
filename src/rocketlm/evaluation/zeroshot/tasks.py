"""Task definitions: the standard lm-evaluation-harness prompts over local documents.

Every definition below is a copy of the same-named task of lm-evaluation-harness 0.4.x
(``lm_eval/tasks/<task>/*.yaml``: same ``doc_to_text``, ``doc_to_target``,
``doc_to_choice``, ``description``, splits, metrics and aggregations), with the dataset
replaced by the local documents of :mod:`.data` (which use the hub field names). The
tests compare the rendered prompts with the installed lm-eval's own YAMLs.

Only this module and :mod:`.runner` import lm-eval, and only inside functions.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from rocketlm.errors import ConfigError
from .data import EXPECTED_COUNTS, MMLU_SUBJECTS

PAPER_TASKS: tuple[str, ...] = ("piqa", "hellaswag", "lambada_openai", "arc_easy", "arc_challenge",
                                "sciq", "race", "mmlu")
ALL_TASKS: tuple[str, ...] = PAPER_TASKS + ("winogrande", "boolq")
GROUPS: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS, "all": ALL_TASKS}
ALIASES: dict[str, str] = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge",
                           "arc-e": "arc_easy", "arc-c": "arc_challenge", "arce": "arc_easy",
                           "arcc": "arc_challenge"}


def resolve_tasks(spec: str) -> list[str]:
    """``"paper"``, ``"all"`` or a comma list of task names (groups may be mixed in).

    Names are case-insensitive, ``-`` and ``_`` are interchangeable, and a few aliases are
    accepted (``lambada`` -> ``lambada_openai``, ``arc_e`` / ``arc_c``). Duplicates are dropped,
    order is kept. An unknown name raises :class:`~rocketlm.errors.ConfigError` listing the valid names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty task list {spec!r}: use 'paper', 'all' or a comma list of "
                         f"{', '.join(ALL_TASKS)}")
    out: list[str] = []
    unknown: list[str] = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name).replace("-", "_")
        name = ALIASES.get(name, name)
        if name in GROUPS:
            names = list(GROUPS[name])
        elif name in ALL_TASKS:
            names = [name]
        else:
            unknown.append(raw.strip())
            continue
        out.extend(n for n in names if n not in out)
    if unknown:
        raise ConfigError(
            f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}: valid names are "
            f"{', '.join(ALL_TASKS)}, or the groups 'paper' ({', '.join(PAPER_TASKS)}) and "
            f"'all' (paper + winogrande, boolq); aliases: {', '.join(sorted(ALIASES))}")
    if not out:
        raise ConfigError(f"empty task list {spec!r}: use 'paper', 'all' or a comma list of "
                         f"{', '.join(ALL_TASKS)}")
    return out


# --------------------------------------------------------------------------- helper functions
# Copies of lm_eval/tasks/hellaswag/utils.py and lm_eval/tasks/winogrande/preprocess_winogrande.py.

def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(docs: list[dict]) -> list[dict]:
    """lm-eval's ``process_docs`` for HellaSwag, applied to a list once (instead of a
    ``Dataset.map`` that lm-eval repeats on every access of the split)."""
    return [{**doc, **hellaswag_process_doc(doc)} for doc in docs]


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


# --------------------------------------------------------------------------- task specs

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
PERPLEXITY = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task of the suite."""

    name: str
    split: str  # split the standard task evaluates ("validation" or "test")
    config: dict[str, Any]  # lm-eval TaskConfig fields (without task/dataset)
    standard_yaml: str  # the lm-eval YAML this reproduces (relative to lm_eval/tasks)
    metrics: tuple[str, ...]
    note: str = ""  # deviation of the local copy from the standard task ("" = none)
    hub: dict[str, Any] = field(default_factory=dict)  # dataset_path/name of the standard task
    local: bool = True  # False: no local copy exists (RACE)
    prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None  # = standard process_docs

    @property
    def expected_count(self) -> int | None:
        return EXPECTED_COUNTS.get(self.name)


_MC = {"output_type": "multiple_choice"}
_ARC = dict(_MC, doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}",
            metric_list=[ACC, ACC_NORM], metadata={"version": 1.0})

TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec(
        "piqa", "validation",
        dict(_MC, doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
             doc_to_choice="{{[sol1, sol2]}}", metric_list=[ACC, ACC_NORM], metadata={"version": 1.0}),
        "piqa/piqa.yaml", ("acc", "acc_norm"), hub={"dataset_path": "baber/piqa"}),
    "hellaswag": TaskSpec(
        "hellaswag", "validation",
        dict(_MC, doc_to_text="{{query}}", doc_to_target="{{label}}",
             doc_to_choice="choices", metric_list=[ACC, ACC_NORM], metadata={"version": 1.0}),
        "hellaswag/hellaswag.yaml", ("acc", "acc_norm"), prepare=hellaswag_process_docs,
        note=("local copy lost the ctx_a/ctx_b split: the standard prompt capitalises ctx_b, "
              "here the context is used as stored (prompts close to, not byte-identical with, "
              "the standard harness)"),
        hub={"dataset_path": "Rowan/hellaswag"}),
    "lambada_openai": TaskSpec(
        "lambada_openai", "test",
        dict(output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
             doc_to_target="{{' '+text.split(' ')[-1]}}", metric_list=[PERPLEXITY, ACC],
             metadata={"version": 1.0}),
        "lambada/lambada_openai.yaml", ("acc", "perplexity"),
        hub={"dataset_path": "EleutherAI/lambada_openai", "dataset_name": "default"}),
    "arc_easy": TaskSpec("arc_easy", "test", dict(_ARC), "arc/arc_easy.yaml", ("acc", "acc_norm"),
                         hub={"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"}),
    "arc_challenge": TaskSpec("arc_challenge", "test", dict(_ARC), "arc/arc_challenge.yaml",
                              ("acc", "acc_norm"),
                              hub={"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Challenge"}),
    "sciq": TaskSpec(
        "sciq", "test",
        dict(_MC, doc_to_text="{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", doc_to_target=3,
             doc_to_choice="{{[distractor1, distractor2, distractor3, correct_answer]}}",
             metric_list=[ACC, ACC_NORM], metadata={"version": 1.0}),
        "sciq/sciq.yaml", ("acc", "acc_norm"), hub={"dataset_path": "allenai/sciq"}),
    "race": TaskSpec("race", "test", {}, "race/race.yaml", ("acc",), local=False,
                     hub={"dataset_path": "EleutherAI/race", "dataset_name": "high"}),
    "mmlu": TaskSpec(
        "mmlu", "test",
        dict(_MC, doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
             doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer", metric_list=[ACC],
             metadata={"version": 1.0}),
        "mmlu/default/_default_template_yaml", ("acc",), hub={"dataset_path": "cais/mmlu"}),
    "winogrande": TaskSpec(
        "winogrande", "validation",
        dict(_MC, doc_to_text=winogrande_doc_to_text, doc_to_target=winogrande_doc_to_target,
             doc_to_choice=winogrande_doc_to_choice, metric_list=[ACC], metadata={"version": 1.0}),
        "winogrande/default.yaml", ("acc",),
        hub={"dataset_path": "allenai/winogrande", "dataset_name": "winogrande_xl"}),
    "boolq": TaskSpec(
        "boolq", "validation",
        dict(_MC, doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:", doc_to_target="label",
             doc_to_choice=["no", "yes"], metric_list=[ACC], metadata={"version": 2.0}),
        "super_glue/boolq/default.yaml", ("acc",),
        note=("local copy's passages lack the 'Title -- ' prefix of the SuperGLUE passages the "
              "standard prompt starts with"),
        hub={"dataset_path": "aps/super_glue", "dataset_name": "boolq"}),
}

assert set(TASKS) == set(ALL_TASKS)

RACE_UNAVAILABLE = ("no local copy of RACE (high, test) exists in the offline data; it is not "
                    "evaluated and not part of the average. Run with --data hub when the "
                    "HuggingFace hub is reachable to include it.")


def _describe(value: Any) -> Any:
    if callable(value):
        return f"<function {getattr(value, '__name__', repr(value))} (copy of lm-eval's)>"
    return value


def describe_task(name: str, *, source: str) -> dict[str, Any]:
    """JSON-serialisable summary of the resolved task definition (for the result file)."""
    spec = TASKS[name]
    cfg = {k: _describe(v) for k, v in spec.config.items() if k != "metadata"}
    cfg["metric_list"] = [m["metric"] for m in spec.config.get("metric_list", [])]
    if spec.prepare is not None:
        cfg["process_docs"] = _describe(spec.prepare)
    out = {"standard_task": f"lm_eval/tasks/{spec.standard_yaml}", "split": spec.split,
           "num_fewshot": 0, "source": source, **cfg}
    if name == "mmlu":
        out["description"] = mmlu_description("<subject>")
        out["subtasks"] = len(MMLU_SUBJECTS)
        out["aggregation"] = "acc weighted by subject size (lm-eval weight_by_size=True)"
    if spec.note:
        out["deviation"] = spec.note
    return out


# --------------------------------------------------------------------------- lm-eval glue

class _CustomKwargsFilter(logging.Filter):
    """Drops lm-eval's per-task hint about ``--metadata`` that any ``custom_dataset`` triggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@contextlib.contextmanager
def _no_custom_dataset_hint():
    task_logger = logging.getLogger("lm_eval.api.task")
    flt = _CustomKwargsFilter()
    task_logger.addFilter(flt)
    try:
        yield
    finally:
        task_logger.removeFilter(flt)


def _dataset_factory(split: str, docs: list[dict[str, Any]]) -> Callable[..., Any]:
    def custom_dataset(**_kwargs):
        import datasets
        return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    return custom_dataset


def _split_keys(split: str) -> dict[str, Any]:
    return {"training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}


def make_local_task(name: str, docs: list[dict[str, Any]], *, lm_eval_name: str | None = None,
                    extra: dict[str, Any] | None = None):
    """An lm-eval ``ConfigurableTask`` with the standard prompt of ``name`` over ``docs``."""
    from lm_eval.api.task import ConfigurableTask

    spec = TASKS[name]
    if spec.prepare is not None:
        docs = spec.prepare(docs)
    cfg = dict(spec.config)
    cfg["metric_list"] = [dict(m) for m in cfg["metric_list"]]
    cfg["metadata"] = dict(cfg.get("metadata", {}), source="rocketlm-local")
    cfg.update(_split_keys(spec.split))
    cfg.update(task=lm_eval_name or name, custom_dataset=_dataset_factory(spec.split, docs),
               num_fewshot=0, **(extra or {}))
    with _no_custom_dataset_hint():
        task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=0)
    return task


def build_local(name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"tasks": {...}, "groups": {...}}`` (the dict lm-eval's ``evaluate`` takes) for ``name``.

    MMLU becomes the standard group: 57 ``mmlu_<subject>`` tasks (each with its subject
    description) in the four category groups under ``mmlu``, all aggregating ``acc``
    weighted by size as lm-eval's ``mmlu`` group does.
    """
    if name != "mmlu":
        return {"tasks": {name: make_local_task(name, docs)}, "groups": {}}

    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig

    agg = [{"metric": "acc", "weight_by_size": True}]
    top = Group.from_config(GroupConfig(group="mmlu", aggregate_metric_list=agg, metadata={"version": 2}))
    cats: dict[str, Any] = {}
    for cat in ("stem", "other", "social_sciences", "humanities"):  # lm-eval's group order
        cats[cat] = Group.from_config(GroupConfig(group=f"mmlu_{cat}", group_alias=cat,
                                                  aggregate_metric_list=agg, metadata={"version": 2}))
        top.add(cats[cat])
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_subject.setdefault(d["subject"], []).append(d)
    tasks = {}
    for subject in sorted(by_subject):
        t = make_local_task("mmlu", by_subject[subject], lm_eval_name=f"mmlu_{subject}",
                            extra={"description": mmlu_description(subject), "task_alias": subject})
        tasks[f"mmlu_{subject}"] = t
        cats[MMLU_SUBJECTS[subject]].add(t)
    groups = {"mmlu": top, **{f"mmlu_{c}": g for c, g in cats.items()}}
    return {"tasks": tasks, "groups": groups}


def build_hub(name: str) -> dict[str, Any]:
    """The standard lm-eval task (or group) ``name`` reading its HuggingFace hub dataset."""
    from lm_eval.tasks import TaskManager

    try:
        loaded = TaskManager().load([name])
    except Exception as exc:  # noqa: BLE001 - any download/connection error
        spec = TASKS[name]
        raise RuntimeError(
            f"could not load the standard lm-eval task {name!r} from the HuggingFace hub "
            f"(dataset {spec.hub.get('dataset_path')!r}): {type(exc).__name__}: {exc}. The hub is "
            f"probably unreachable (offline machine): use local data instead (--data DIR or "
            f"ROCKETLM_DATA=DIR with DIR/zeroshot/<task>/, see shared/data/README.md)") from exc
    for t in loaded["tasks"].values():
        if t.get_config("num_fewshot") is None:
            t.set_config(key="num_fewshot", value=0)
    return {"tasks": loaded["tasks"], "groups": loaded.get("groups", {})}
