"""Human table and JSON file for :func:`evaluate_zeroshot` results."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

_METRICS = ("acc", "acc_norm", "perplexity")


def _fmt(x: Any, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if metric == "perplexity" else f"{x:.4f}"


def format_table(result: dict[str, Any], *, per_subject: bool = False) -> str:
    """Fixed-width table: task, metric, value, stderr, n; notes; then the average line.

    Tasks whose local copy deviates from the standard one are marked ``*`` with the reason
    below the table; unavailable tasks are listed as such. ``per_subject`` adds MMLU's
    four category rows.
    """
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    for name, e in result.get("tasks", {}).items():
        label = name
        if e.get("note"):
            label = f"{name}*"
            notes.append(f"* {name}: {e['note']}")
        first = True
        for m in _METRICS:
            if m in e and e[m] is not None:
                n = e.get("n")
                rows.append((label if first else "", m, _fmt(e[m], m), _fmt(e.get(f"{m}_stderr"), m),
                             "" if n is None else str(n)))
                first = False
        if per_subject and e.get("groups"):
            for g, ge in e["groups"].items():
                rows.append((f"  - {g}", "acc", _fmt(ge.get("acc"), "acc"), _fmt(ge.get("acc_stderr"), "acc"),
                             str(ge.get("n", ""))))
    for name, why in result.get("unavailable", {}).items():
        rows.append((name, "-", "unavailable", "-", "-"))
        notes.append(f"{name}: {why}")
    avg = result.get("average") or {}
    if avg.get("value") is not None:
        k = len(avg.get("tasks", []))
        rows.append((f"average ({k} task{'s' if k != 1 else ''})", avg.get("metric", "acc"),
                     _fmt(avg["value"], "acc"), "-", ""))
    header = ("task", "metric", "value", "stderr", "n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]

    def line(r):
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-+-".join("-" * w for w in widths)
    body = [line(header), sep]
    body += [line(r) for r in rows[:-1]] if avg.get("value") is not None else [line(r) for r in rows]
    if avg.get("value") is not None:
        body += [sep, line(rows[-1])]
    if result.get("limit"):
        notes.append(f"limit: first {result['limit']} documents per task (per subject for MMLU); "
                     f"not comparable with full-set numbers")
    if avg.get("value") is not None:
        alt = (avg.get("alternatives") or {}).get("acc_norm_else_acc")
        notes.append(f"average = unweighted mean of {avg.get('metric', 'acc')} over "
                     f"{', '.join(avg.get('tasks', []))}"
                     + (f"; with acc_norm where a task has it: {alt:.4f}" if alt is not None else ""))
    return "\n".join(body + ([""] + notes if notes else []))


def save_json(result: dict[str, Any], path: str | os.PathLike, *, per_example: bool = True) -> Path:
    """Write ``result`` as JSON (``per_example=False`` drops the per-document lists)."""
    if not per_example:
        result = {**result, "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "per_example"}
                                      for k, v in result.get("tasks", {}).items()}}
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    return path
