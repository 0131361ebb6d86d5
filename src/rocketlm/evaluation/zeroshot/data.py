"""Offline document parsers for the zero-shot suite.

Each ``load_<task>(data_dir)`` reads the local copy under ``<data_dir>/zeroshot/<task>/``
(the layout of ``shared/data/README.md``) and returns a list of plain dicts **in the
schema of the HuggingFace dataset the standard lm-evaluation-harness task reads**
(``baber/piqa``, ``Rowan/hellaswag``, ``allenai/ai2_arc``, ``cais/mmlu``, ``aps/super_glue``
boolq, ...). Because the field names are the hub ones, the task definitions in
:mod:`rocketlm.evaluation.zeroshot.tasks` can use the standard lm-eval prompt templates
unchanged. Documents keep file order (which is the hub order for every file here).

These functions are pure (no lm-eval import) so they can be unit-tested on their own.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable
from rocketlm.errors import MissingDataError  # noqa: F401  (re-exported)

DATA_ENV = "ROCKETLM_DATA"

# Published record counts of the evaluation split of every local file.
EXPECTED_COUNTS: dict[str, int] = {
    "piqa": 1838,
    "hellaswag": 10042,
    "lambada_openai": 5153,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "sciq": 1000,
    "mmlu": 14042,
    "winogrande": 1267,
    "boolq": 3270,
}

# Files each task needs, relative to the ``zeroshot`` directory.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl",),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "sciq": ("sciq/test.json",),
    "mmlu": ("mmlu/test",),  # a directory of <subject>_test.csv files
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "boolq": ("boolq/boolq_dev.jsonl",),
}

# The 57 MMLU subjects and their category, as in lm-eval's tasks/mmlu/_generate_configs.py.
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem", "college_mathematics": "stem",
    "college_medicine": "other", "college_physics": "stem", "computer_security": "stem",
    "conceptual_physics": "stem", "econometrics": "social_sciences", "electrical_engineering": "stem",
    "elementary_mathematics": "stem", "formal_logic": "humanities", "global_facts": "other",
    "high_school_biology": "stem", "high_school_chemistry": "stem",
    "high_school_computer_science": "stem", "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences", "international_law": "humanities",
    "jurisprudence": "humanities", "logical_fallacies": "humanities", "machine_learning": "stem",
    "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities",
    "professional_medicine": "other", "professional_psychology": "social_sciences",
    "public_relations": "social_sciences", "security_studies": "social_sciences",
    "sociology": "social_sciences", "us_foreign_policy": "social_sciences", "virology": "other",
    "world_religions": "humanities",
}




# --------------------------------------------------------------------------- locating data

def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the ``zeroshot`` directory to read from.

    ``data_dir`` (or ``$ROCKETLM_DATA`` when it is None) may be the data root that holds
    ``zeroshot/`` or the ``zeroshot`` directory itself.
    """
    if data_dir is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise MissingDataError(
                f"no zero-shot data directory given: pass data_dir=DIR (CLI: --data DIR) or set "
                f"{DATA_ENV}=DIR, where DIR/zeroshot/<task>/ holds the local task files "
                f"(layout: shared/data/README.md); or use data_dir='hub' to download the standard "
                f"datasets from the HuggingFace hub (needs internet)")
        data_dir = env
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingDataError(
            f"zero-shot data directory {str(root)!r} does not exist; pass an existing directory "
            f"(CLI: --data DIR, or set {DATA_ENV}) whose zeroshot/<task>/ subfolders hold the task files")
    if (root / "zeroshot").is_dir():
        return root / "zeroshot"
    if any((root / sub).exists() for sub in ("piqa", "mmlu", "arc", "hellaswag", "sciq")):
        return root  # already the zeroshot directory
    raise MissingDataError(
        f"{str(root)!r} has no 'zeroshot' subfolder; point --data / {DATA_ENV} at the data root "
        f"that contains zeroshot/<task>/ (layout: shared/data/README.md)")


def _zdir(data_dir: str | os.PathLike) -> Path:
    """``data_dir`` may be the data root (holding ``zeroshot/``) or the ``zeroshot`` dir itself."""
    p = Path(data_dir).expanduser()
    return p / "zeroshot" if (p / "zeroshot").is_dir() else p


def check_files(task: str, data_dir: str | os.PathLike) -> Path:
    """Raise :class:`MissingDataError` naming every missing file of ``task``; return the zeroshot dir."""
    zdir = _zdir(data_dir)
    missing = [rel for rel in REQUIRED_FILES[task] if not (zdir / rel).exists()]
    if missing:
        raise MissingDataError(
            f"zero-shot task {task!r}: missing data file(s) {', '.join(missing)} under {str(zdir)!r}. "
            f"Put the official files there (layout: shared/data/README.md), point --data / "
            f"{DATA_ENV} at a directory that has them, or leave {task!r} out of --tasks.")
    return zdir


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _bad(path: Path, what: str) -> MissingDataError:
    return MissingDataError(f"{str(path)!r}: {what}; the file is not the expected format "
                            f"(see shared/data/README.md) - replace it with the official copy")


# --------------------------------------------------------------------------- parsers

def load_piqa(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """PIQA validation -> ``{goal, sol1, sol2, label:int}`` (schema of ``baber/piqa``)."""
    d = check_files("piqa", data_dir) / "piqa"
    docs = _read_jsonl(d / "valid.jsonl")
    labels = _read_lines(d / "valid-labels.lst")
    if len(docs) != len(labels):
        raise _bad(d / "valid-labels.lst", f"{len(labels)} labels for {len(docs)} questions")
    return [{"goal": x["goal"], "sol1": x["sol1"], "sol2": x["sol2"], "label": int(lab)}
            for x, lab in zip(docs, labels)]


def load_hellaswag(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """HellaSwag validation from the 6-lines-per-item text file -> ``Rowan/hellaswag`` fields.

    The local file keeps ``"activity_label: ctx_a ctx_b"`` as one line, so the ctx_a/ctx_b
    split is lost: the whole context goes into ``ctx_a`` and ``ctx_b`` is ``""``. The standard
    prompt capitalises ``ctx_b`` (``ctx_b.capitalize()``), which cannot be reproduced; prompts
    are otherwise identical (same preprocessing, same endings).
    """
    path = check_files("hellaswag", data_dir) / "hellaswag" / "hellaswag_val_full.txt"
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _bad(path, f"{len(lines)} lines is not a multiple of 6")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        if label not in ("0", "1", "2", "3"):
            raise _bad(path, f"line {i + 2}: label {label!r} is not 0..3")
        activity, sep, rest = ctx.partition(": ")
        if not sep:
            activity, rest = "", ctx
        docs.append({"ind": i // 6, "activity_label": activity, "ctx_a": rest, "ctx_b": "",
                     "ctx": rest, "endings": endings, "source_id": "", "split": "val",
                     "split_type": "", "label": label})
    return docs


def load_lambada_openai(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI version) test -> ``{text}`` (schema of ``EleutherAI/lambada_openai``)."""
    z = check_files("lambada_openai", data_dir)
    return [{"text": x["text"]} for x in _read_jsonl(z / "lambada_openai" / "lambada_test.jsonl")]


def _load_arc(path: Path) -> list[dict[str, Any]]:
    out = []
    for x in _read_jsonl(path):
        choices = x["question"]["choices"]
        out.append({"id": x["id"], "question": x["question"]["stem"],
                    "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                    "answerKey": x["answerKey"]})
        if x["answerKey"] not in out[-1]["choices"]["label"]:
            raise _bad(path, f"question {x['id']}: answerKey {x['answerKey']!r} is not a choice label")
    return out


def load_arc_easy(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """ARC-Easy test -> ``{id, question, choices:{text,label}, answerKey}`` (``allenai/ai2_arc``)."""
    z = check_files("arc_easy", data_dir)
    return _load_arc(z / "arc" / "ARC-Easy-Test.jsonl")


def load_arc_challenge(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """ARC-Challenge test, same schema as :func:`load_arc_easy`."""
    z = check_files("arc_challenge", data_dir)
    return _load_arc(z / "arc" / "ARC-Challenge-Test.jsonl")


def load_sciq(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """SciQ test -> ``{question, distractor1..3, correct_answer, support}`` (``allenai/sciq``)."""
    path = check_files("sciq", data_dir) / "sciq" / "test.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    keys = ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")
    return [{k: x.get(k, "") for k in keys} for x in raw]


def load_mmlu(data_dir: str | os.PathLike, split: str = "test") -> list[dict[str, Any]]:
    """MMLU (57 subjects) -> ``{question, subject, choices:[4], answer:int}`` (``cais/mmlu``).

    Documents are ordered by subject (alphabetically, as the subject list) then file row.
    """
    d = check_files("mmlu", data_dir) / "mmlu" / split
    found = {p.name[: -len(f"_{split}.csv")] for p in d.glob(f"*_{split}.csv")}
    missing = sorted(set(MMLU_SUBJECTS) - found)
    if missing:
        raise MissingDataError(
            f"zero-shot task 'mmlu': {len(missing)} subject file(s) missing under {str(d)!r} "
            f"(e.g. {missing[0]}_{split}.csv); MMLU needs all 57 <subject>_{split}.csv files of the "
            f"official data.tar, or leave 'mmlu' out of --tasks")
    docs = []
    for subject in sorted(MMLU_SUBJECTS):
        path = d / f"{subject}_{split}.csv"
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise _bad(path, f"row {row[:1]!r} does not have question, A, B, C, D, answer")
                docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                             "answer": "ABCD".index(row[5])})
    return docs


def load_winogrande(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """WinoGrande (xl) validation -> ``{sentence, option1, option2, answer:"1"|"2"}``."""
    d = check_files("winogrande", data_dir) / "winogrande"
    docs = _read_jsonl(d / "dev.jsonl")
    labels = _read_lines(d / "dev-labels.lst")
    if len(docs) != len(labels):
        raise _bad(d / "dev-labels.lst", f"{len(labels)} labels for {len(docs)} sentences")
    out = []
    for x, lab in zip(docs, labels):
        if lab not in ("1", "2"):
            raise _bad(d / "dev-labels.lst", f"label {lab!r} is not 1 or 2")
        if "_" not in x["sentence"]:
            raise _bad(d / "dev.jsonl", f"sentence {x.get('qID')} has no '_' blank")
        out.append({"sentence": x["sentence"], "option1": x["option1"], "option2": x["option2"],
                    "answer": lab})
    return out


def load_boolq(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """BoolQ validation -> ``{passage, question, idx, label}`` (``aps/super_glue`` boolq).

    The local copy is reformatted (``query = "Passage: P\\nQuestion: Q?"``); the passage is
    recovered without the ``"Title -- "`` prefix that the SuperGLUE passages carry, and the
    trailing ``?`` of the question is dropped because the standard template adds it.
    """
    path = check_files("boolq", data_dir) / "boolq" / "boolq_dev.jsonl"
    out = []
    for i, x in enumerate(_read_jsonl(path)):
        query = x["query"]
        if not query.startswith("Passage: ") or "\nQuestion: " not in query:
            raise _bad(path, f"record {i}: query does not look like 'Passage: ...\\nQuestion: ...'")
        passage, question = query[len("Passage: "):].rsplit("\nQuestion: ", 1)
        if question.endswith("?"):
            question = question[:-1]
        if list(x.get("choices", ["no", "yes"])) != ["no", "yes"] or x["gold"] not in (0, 1):
            raise _bad(path, f"record {i}: expected choices ['no', 'yes'] and gold 0/1")
        out.append({"passage": passage, "question": question, "idx": i, "label": int(x["gold"])})
    return out


LOADERS: dict[str, Callable[[str | os.PathLike], list[dict[str, Any]]]] = {
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "lambada_openai": load_lambada_openai,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "sciq": load_sciq,
    "mmlu": load_mmlu,
    "winogrande": load_winogrande,
    "boolq": load_boolq,
}


def load_task_docs(task: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Documents of a local task; ``data_dir`` as in :func:`resolve_data_dir`."""
    if task not in LOADERS:
        raise MissingDataError(f"zero-shot task {task!r} has no local data loader "
                               f"(local tasks: {', '.join(LOADERS)})")
    return LOADERS[task](resolve_data_dir(data_dir))
