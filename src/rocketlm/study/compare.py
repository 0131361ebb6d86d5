"""From finished runs to the study's tables and tests (pure functions on the run records).

A *run record* is the dict the runner writes per (seed, ratio, cost): ``seed``, ``ratio``,
``cost``, ``allocation``, ``stages``, ``ppl`` (with per-unit mean NLLs ``unit_nll``),
``zeroshot`` (the :func:`rocketlm.evaluation.zeroshot.evaluate_zeroshot` result or None),
``eval_seconds``.

* :func:`main_table`: mean +- std over seeds of PPL, average accuracy and every task's accuracy.
* :func:`paired_statistics`: per ratio, every cost against the reference cost: per-task and
  average accuracy differences with paired bootstrap CIs over examples (and seeds), and the
  perplexity difference with its spread over seeds and a bootstrap CI over evaluation windows.
* :func:`runtime_summary`: wall time of each stage per cost.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from rocketlm.study.stats import mean_std, paired_bootstrap

ACC_METRIC = "acc"


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def reference_cost(costs: Sequence[str]) -> str:
    """The baseline every other cost is compared with: ``weight`` (ROCKET) when studied, else the first."""
    return "weight" if "weight" in costs else costs[0]


def _group(runs: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """(ratio key, cost) -> its runs, seeds in the order of first appearance in ``runs``."""
    seed_order = list(dict.fromkeys(r["seed"] for r in runs))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(ratio_key(run["ratio"]), run["cost"])].append(run)
    return {k: sorted(v, key=lambda r: seed_order.index(r["seed"])) for k, v in groups.items()}


def task_accuracy(zeroshot: dict | None) -> dict[str, float]:
    if not zeroshot:
        return {}
    return {t: e[ACC_METRIC] for t, e in zeroshot["tasks"].items() if e.get(ACC_METRIC) is not None}


def average_accuracy(zeroshot: dict | None) -> float | None:
    return None if not zeroshot else zeroshot["average"]["value"]


def _ms(values: Sequence[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    return mean_std(vals).to_json() if vals and len(vals) == len(values) else None


def main_table(runs: Sequence[dict], dense: dict | None = None, costs: Sequence[str] | None = None) -> dict:
    """``{"dense": {...}, "rows": [{ratio, cost, n_seeds, ppl, acc, achieved_removed_ratio, tasks}]}``;
    rows by ratio, then in the order of ``costs`` (default: first appearance in ``runs``)."""
    order = list(costs or dict.fromkeys(r["cost"] for r in runs))
    rows = []
    for (rk, cost), group in sorted(_group(runs).items(), key=lambda kv: (float(kv[0][0]), order.index(kv[0][1]))):
        tasks = sorted({t for r in group for t in task_accuracy(r["zeroshot"])})
        rows.append({
            "ratio": float(rk), "cost": cost, "n_seeds": len(group), "seeds": [r["seed"] for r in group],
            "ppl": _ms([r["ppl"]["perplexity"] for r in group]),
            "acc": _ms([average_accuracy(r["zeroshot"]) for r in group]),
            "achieved_removed_ratio": _ms([r["allocation"]["achieved_removed_ratio"] for r in group]),
            "tasks": {t: _ms([task_accuracy(r["zeroshot"]).get(t) for r in group]) for t in tasks},
        })
    out = {"rows": rows}
    if dense is not None:
        out["dense"] = {"ppl": dense["ppl"]["perplexity"], "acc": average_accuracy(dense["zeroshot"]),
                        "tasks": task_accuracy(dense["zeroshot"])}
    return out


def _per_example(run: dict, task: str) -> tuple[list, np.ndarray]:
    per = run["zeroshot"]["tasks"][task]["per_example"]
    return list(per["doc_id"]), np.asarray(per[ACC_METRIC], dtype=np.float64)


def _aligned_diffs(ref_runs: Sequence[dict], runs: Sequence[dict], task: str) -> np.ndarray:
    """(n_seeds, n_examples): per-example correctness of ``runs`` minus ``ref_runs``, seed by seed,
    aligned on the documents every run scored."""
    pairs = [(_per_example(a, task), _per_example(b, task)) for a, b in zip(ref_runs, runs)]
    common = set(pairs[0][0][0])
    for (ids_a, _), (ids_b, _) in pairs:
        common &= set(ids_a) & set(ids_b)
    order = [d for d in pairs[0][0][0] if d in common]
    rows = []
    for (ids_a, acc_a), (ids_b, acc_b) in pairs:
        ia, ib = {d: i for i, d in enumerate(ids_a)}, {d: i for i, d in enumerate(ids_b)}
        rows.append(acc_b[[ib[d] for d in order]] - acc_a[[ia[d] for d in order]])
    return np.stack(rows)


def _ppl_statistics(ref_runs: Sequence[dict], runs: Sequence[dict], boot: dict) -> dict:
    ppl_a = [r["ppl"]["perplexity"] for r in ref_runs]
    ppl_b = [r["ppl"]["perplexity"] for r in runs]
    out = {"reference": ppl_a, "other": ppl_b,
           "diff": mean_std([b - a for a, b in zip(ppl_a, ppl_b)]).to_json(),
           "relative_diff": mean_std([b / a - 1.0 for a, b in zip(ppl_a, ppl_b)]).to_json()}
    units = [(a["ppl"].get("unit_nll"), b["ppl"].get("unit_nll")) for a, b in zip(ref_runs, runs)]
    if all(ua and ub and len(ua) == len(ub) for ua, ub in units) and len({len(ua) for ua, _ in units}) == 1:
        diffs = np.array([np.subtract(ub, ua) for ua, ub in units])  # (n_seeds, n_units): NLL difference
        ci = paired_bootstrap([diffs], **boot)
        out["log_ratio_ci"] = ci.to_json()  # mean NLL difference = log(PPL_b / PPL_a)
        out["ratio_ci"] = {"ratio": math.exp(ci.mean_diff), "low": math.exp(ci.low), "high": math.exp(ci.high),
                           "significant": ci.significant, "confidence": ci.confidence,
                           "units": len(units[0][0])}
    return out


def paired_statistics(runs: Sequence[dict], costs: Sequence[str], *, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """ratio key -> "ref|other" -> {"reference", "other", "seeds", "tasks": {task: CI}, "average": CI,
    "perplexity": {...}}; differences are other minus reference (accuracy as a fraction, not pp)."""
    ref = reference_cost(costs)
    groups = _group(runs)
    out: dict = {}
    for rk in sorted({k[0] for k in groups}, key=float):
        for cost in costs:
            if cost == ref or (rk, cost) not in groups or (rk, ref) not in groups:
                continue
            a_runs, b_runs = groups[(rk, ref)], groups[(rk, cost)]
            seeds = [r["seed"] for r in a_runs if r["seed"] in {x["seed"] for x in b_runs}]
            a_runs = [r for r in a_runs if r["seed"] in seeds]
            b_runs = [r for r in b_runs if r["seed"] in seeds]
            boot = {"n_boot": n_boot, "confidence": confidence, "seed": seed, "resample_seeds": len(seeds) >= 3}
            entry = {"reference": ref, "other": cost, "seeds": seeds,
                     "perplexity": _ppl_statistics(a_runs, b_runs, boot)}
            if all(r["zeroshot"] for r in a_runs + b_runs):
                avg_tasks = [t for t in a_runs[0]["zeroshot"]["average"]["tasks"]
                             if all(t in task_accuracy(r["zeroshot"]) for r in a_runs + b_runs)]
                strata = {t: _aligned_diffs(a_runs, b_runs, t) for t in avg_tasks}
                entry["tasks"] = {t: paired_bootstrap([d], **boot).to_json() for t, d in strata.items()}
                if strata:
                    entry["average"] = {**paired_bootstrap(list(strata.values()), **boot).to_json(),
                                        "tasks": avg_tasks}
            out.setdefault(rk, {})[f"{ref}|{cost}"] = entry
    return out


RUN_STAGES = ("calibration", "profiling", "allocation", "compression")


def runtime_summary(runs: Sequence[dict], costs: Sequence[str], sweep: dict | None = None) -> dict:
    """Per cost: mean seconds of each stage over its runs (cache hits included as recorded), plus
    the fresh calibration + profiling time per seed (the largest over that seed's runs: the one
    call that computed them), and the sweep's allocation solve times per cost."""
    per_cost = {}
    for cost in costs:
        mine = [r for r in runs if r["cost"] == cost]
        if not mine:
            continue
        stages = {s: float(np.mean([r["stages"].get(s, {}).get("seconds", 0.0) for r in mine])) for s in RUN_STAGES}
        stages["solve"] = float(np.mean([r["allocation"]["solve_seconds"] for r in mine]))
        for name in ("perplexity", "zeroshot"):
            vals = [r["eval_seconds"].get(name) for r in mine if r["eval_seconds"].get(name) is not None]
            stages[name] = float(np.mean(vals)) if vals else None
        stages["n_runs"] = len(mine)
        per_cost[cost] = stages
    shared = {}
    for seed in dict.fromkeys(r["seed"] for r in runs):
        mine = [r for r in runs if r["seed"] == seed]
        shared[str(seed)] = {s: max(r["stages"].get(s, {}).get("seconds", 0.0) for r in mine)
                             for s in ("calibration", "profiling")}
    out = {"per_cost": per_cost, "profiling_per_seed": shared}
    if sweep:
        solve = defaultdict(list)
        for points in sweep.values():
            for point in points:
                for cost, entry in point["costs"].items():
                    if "solve_seconds" in entry:
                        solve[cost].append(entry["solve_seconds"])
        out["sweep_solve_seconds"] = {c: float(np.mean(v)) for c, v in solve.items()}
    return out
