"""Zero-shot accuracy suite (PIQA, HellaSwag, LAMBADA, ARC-E/C, SciQ, RACE, MMLU, WinoGrande,
BoolQ) on lm-evaluation-harness, run on the in-memory (possibly compressed) model.

* :func:`evaluate_zeroshot` runs the tasks through ``lm_eval.models.huggingface.HFLM`` with
  the model object itself (no save / reload / densification) and returns per-task
  ``acc`` / ``acc_norm`` (+ LAMBADA perplexity), stderrs, counts, wall times, per-example
  correctness (for paired tests) and the average.
* Data is read offline from ``$ROCKETLM_DATA/zeroshot/`` (or ``data_dir``) by the parsers in
  :mod:`.data`; the prompts, targets and metrics are the standard lm-eval ones
  (:mod:`.tasks`). ``data_dir="hub"`` uses the standard hub datasets instead (online only).
* Headline average: unweighted mean of ``acc`` over the evaluated tasks (every task has
  ``acc``; MMLU counts once). The mean using ``acc_norm`` where a task has it is kept in
  ``result["average"]["alternatives"]``.
"""
from __future__ import annotations

from .data import EXPECTED_COUNTS, LOADERS, MissingDataError, load_arc_challenge, load_arc_easy, \
    load_boolq, load_hellaswag, load_lambada_openai, load_mmlu, load_piqa, load_sciq, load_task_docs, \
    load_winogrande, resolve_data_dir
from .report import format_table, save_json
from .runner import AVERAGE_DOC, AVERAGE_METRIC, evaluate_zeroshot
from .tasks import ALL_TASKS, PAPER_TASKS, TASKS, resolve_tasks

__all__ = [
    "PAPER_TASKS", "ALL_TASKS", "TASKS", "resolve_tasks", "evaluate_zeroshot", "format_table", "save_json",
    "AVERAGE_METRIC", "AVERAGE_DOC", "MissingDataError", "EXPECTED_COUNTS", "LOADERS", "resolve_data_dir",
    "load_task_docs", "load_piqa", "load_hellaswag", "load_lambada_openai", "load_arc_easy",
    "load_arc_challenge", "load_sciq", "load_mmlu", "load_winogrande", "load_boolq",
]
