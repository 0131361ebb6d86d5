"""``report.md`` of the study: tables, plain-language statistics, divergence analysis, runtime,
and how the findings compare with the ActCost paper's claims (computed from the data).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rocketlm.study.compare import ratio_key

# The ActCost paper's claims (arXiv 2606.27785), as published; compared with the data in paper_comparison().
PAPER = {
    "high_ratio": 0.5, "acc_diff_pp": 0.8, "ppl_rel": 61.46 / 52.98 - 1.0,
    "low_ratio": 0.2, "low_acc_diff_pp": -0.2, "low_ppl_rel": 14.45 / 14.66 - 1.0,
    "spearman": 0.99, "layers_differ": (70, 252), "best_ks_share": 0.966, "speedup": 0.077,
}
SIMILAR_SHARE = 0.10  # shares within 10 percentage points of the paper's count as similar
OVERHEAD_REL, OVERHEAD_ABS_S = 0.10, 0.05  # timing noise allowance for "no overhead"
MAX_LISTED_LAYERS = 40


# --------------------------------------------------------------------------- formatting

def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(entry: dict | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    if not entry:
        return "-"
    mean = entry["mean"] * scale
    if entry.get("std") is None:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(entry['std'] * scale, fmt)}"


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _ci_pp(ci: dict) -> str:
    return f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"


def _sig(flag: bool) -> str:
    return "**yes**" if flag else "no"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _nearest(ratios: Sequence[float], target: float) -> float | None:
    return min(ratios, key=lambda r: (abs(r - target), -r)) if ratios else None


def _pair_label(pair: str) -> str:
    ref, other = pair.split("|")
    return f"{other} − {ref}"


# --------------------------------------------------------------------------- sections

def format_main_table(study: dict) -> str:
    """Markdown main table (also printed by the CLI)."""
    table = study["main_table"]
    has_acc = any(r["acc"] for r in table["rows"])
    header = ["removed", "cost", "achieved removed (%)", "WikiText-2 PPL"] + (["avg acc (%)"] if has_acc else [])
    rows = []
    dense = table.get("dense")
    if dense:
        rows.append(["0 (dense)", "-", "0", _f(dense["ppl"])] + ([_f(dense["acc"] and 100 * dense["acc"])]
                                                                  if has_acc else []))
    for r in table["rows"]:
        row = [f"{r['ratio']:g}", r["cost"], _ms(r["achieved_removed_ratio"], 100), _ms(r["ppl"])]
        if has_acc:
            row.append(_ms(r["acc"], 100))
        rows.append(row)
    return "\n".join(_table(header, rows))


def _task_table(study: dict) -> list[str]:
    table = study["main_table"]
    tasks = list(dict.fromkeys(t for r in table["rows"] for t in r["tasks"]))
    if not tasks:
        return []
    notes = {}
    for run in study["runs"][:1] + [study["dense"]]:
        for t, e in ((run.get("zeroshot") or {}).get("tasks") or {}).items():
            if e.get("note"):
                notes[t] = e["note"]
    header = ["removed", "cost"] + [f"{t}*" if t in notes else t for t in tasks] + ["average"]
    rows = []
    dense = table.get("dense")
    if dense and dense.get("tasks"):
        rows.append(["0 (dense)", "-"] + [_f(dense["tasks"].get(t) and 100 * dense["tasks"][t]) for t in tasks]
                    + [_f(dense["acc"] and 100 * dense["acc"])])
    for r in table["rows"]:
        rows.append([f"{r['ratio']:g}", r["cost"]] + [_ms(r["tasks"].get(t), 100, ".1f") for t in tasks]
                    + [_ms(r["acc"], 100, ".1f")])
    lines = ["", "Per-task accuracy (`acc`, %, mean ± std over seeds):", ""] + _table(header, rows)
    lines += [f"\n\\* {t}: {n}" for t, n in notes.items()]
    unavailable = (study["dense"].get("zeroshot") or {}).get("unavailable") or {}
    lines += [f"\nNot evaluated: {t} ({why})" for t, why in unavailable.items()]
    return lines


def _section_main(study: dict) -> list[str]:
    n_seeds = len(study["config"]["seeds"])
    return ["## 1. Main results", "",
            f"Mean ± sample std over {n_seeds} seed(s) "
            f"({', '.join(map(str, study['config']['seeds']))}); the dense model on top. "
            "Average accuracy: " + ("unweighted mean of `acc` over the evaluated tasks." if study["config"]["task_names"]
                                    else "not measured (`--tasks none`)."), "",
            format_main_table(study)] + _task_table(study)


def _verdict_sentence(label: str, ci: dict, other: str) -> str:
    if ci["significant"]:
        return (f"{label}: the difference is **significant** ({'higher' if ci['mean_diff'] > 0 else 'lower'} under "
                f"{other}; the {int(100 * ci['confidence'])}% CI excludes 0)")
    return f"{label}: the difference is **not significant** (the {int(100 * ci['confidence'])}% CI contains 0)"


def _ppl_lines(ppl: dict, ref: str, other: str) -> list[str]:
    diff, rel = ppl["diff"], ppl["relative_diff"]
    per_seed = ", ".join(f"{b - a:+.3f}" for a, b in zip(ppl["reference"], ppl["other"]))
    spread = "" if diff["std"] is None else f" ± {diff['std']:.3f} (std over seeds)"
    rel_spread = "" if rel["std"] is None else f" ± {100 * rel['std']:.2f}"
    lines = [f"- Perplexity: {ref} {np.mean(ppl['reference']):.3f}, {other} {np.mean(ppl['other']):.3f}; "
             f"difference {diff['mean']:+.3f}{spread} (per seed: {per_seed}), relative "
             f"{100 * rel['mean']:+.2f}%{rel_spread}."]
    ci = ppl.get("ratio_ci")
    if ci:
        verdict = ("**significant**" if ci["significant"] else "**not significant**")
        direction = "" if not ci["significant"] else (" (worse under " + other + ")" if ci["ratio"] > 1
                                                      else " (better under " + other + ")")
        lines.append(f"- Perplexity ratio {other}/{ref} from a paired bootstrap over {ci['units']} evaluation "
                     f"unit(s) per seed: {ci['ratio']:.4f}, {int(100 * ci['confidence'])}% CI "
                     f"[{ci['low']:.4f}, {ci['high']:.4f}]: {verdict}{direction}.")
    elif diff["std"] is None:
        lines.append("- With one seed and no per-window data, no spread can be given for the perplexity difference.")
    return lines


def _section_statistics(study: dict) -> list[str]:
    cfg = study["config"]
    lines = ["## 2. Statistics: are the differences real?", "",
             f"Differences are *other cost minus {study['reference_cost']}*, accuracy in percentage points (pp). "
             f"Confidence intervals: {int(100 * cfg['confidence'])}% paired percentile bootstrap "
             f"({cfg['n_boot']} resamples) over the evaluation examples, the same resample for every seed "
             "(all seeds score the same documents), averaging the seeds' paired differences"
             + ("; seeds are resampled too (3 or more seeds)" if len(cfg["seeds"]) >= 3 else "")
             + ". The average-accuracy CI resamples every task's examples and averages the tasks with equal "
             "weight, like the headline average. A difference is significant when its CI excludes 0.", ""]
    if not study["statistics"]:
        return lines + ["Only one cost was studied: nothing to compare.", ""]
    for rk, pairs in study["statistics"].items():
        lines += [f"### Removed ratio {rk}", ""]
        for pair, entry in pairs.items():
            ref, other = entry["reference"], entry["other"]
            lines += [f"**{_pair_label(pair)}** (seeds {', '.join(map(str, entry['seeds']))})", ""]
            summary = []
            if entry.get("tasks"):
                rows = []
                acc = {r["cost"]: r for r in study["main_table"]["rows"] if ratio_key(r["ratio"]) == rk}
                for task, ci in entry["tasks"].items():
                    rows.append([task, _ms(acc[ref]["tasks"].get(task), 100, ".2f"),
                                 _ms(acc[other]["tasks"].get(task), 100, ".2f"), _pp(ci["mean_diff"]), _ci_pp(ci),
                                 str(ci["n_examples"]), _sig(ci["significant"])])
                if entry.get("average"):
                    ci = entry["average"]
                    rows.append(["**average**", _ms(acc[ref]["acc"], 100, ".2f"), _ms(acc[other]["acc"], 100, ".2f"),
                                 _pp(ci["mean_diff"]), _ci_pp(ci), str(ci["n_examples"]), _sig(ci["significant"])])
                    summary.append(_verdict_sentence(f"average accuracy {_pp(ci['mean_diff'])} pp "
                                                     f"(CI {_ci_pp(ci)})", ci, other))
                lines += _table(["task", f"{ref} acc (%)", f"{other} acc (%)", "diff (pp)",
                                 f"{int(100 * cfg['confidence'])}% CI (pp)", "examples", "significant"], rows)
                n_sig = sum(ci["significant"] for ci in entry["tasks"].values())
                summary.append(f"{n_sig} of {len(entry['tasks'])} task(s) differ significantly")
                lines.append("")
            lines += _ppl_lines(entry["perplexity"], ref, other)
            ppl_ci = entry["perplexity"].get("ratio_ci")
            if ppl_ci:
                rel = 100 * (ppl_ci["ratio"] - 1.0)  # the statistic the verdict is about
                summary.append(f"perplexity {rel:+.2f}% (bootstrap ratio): the difference is "
                               + ("**significant**" if ppl_ci["significant"] else "**not significant**"))
            if summary:
                lines.append(f"- In plain words, at removed ratio {rk}: " + "; ".join(summary) + ".")
            lines.append("")
    return lines


def _mean_over_seeds(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _section_divergence(study: dict) -> list[str]:
    div = study["divergence"]
    seeds = list(div)
    lines = ["## 3. Why the costs agree or not", "", "### Error correlation across candidates", "",
             "Per layer, Spearman rank correlation between the weight-space and the output-space error over "
             "that layer's profiled candidates (every removed ratio x ks of the grid).", ""]
    rows = []
    for seed in seeds:
        s = div[seed]["correlation_summary"]
        rows.append([seed, str(s["n_defined"]), _f(s.get("min"), ".4f"), _f(s.get("median"), ".4f"),
                     _f(s.get("mean"), ".4f"), f"{s.get('n_above', 0)} ({_f(100 * s.get('share_above', 0), '.1f')}%)"])
    lines += _table(["seed", "layers", "min", "median", "mean", f"> {div[seeds[0]]['correlation_summary']['threshold']}"],
                    rows)
    lowest = sorted((r for r in div[seeds[0]]["correlations"] if r["spearman"] is not None),
                    key=lambda r: r["spearman"])[:5]
    if lowest:
        lines += ["", f"Lowest correlations (seed {seeds[0]}): "
                  + ", ".join(f"`{r['name']}` {r['spearman']:.4f}" for r in lowest) + "."]
    lines += ["", "### Best ks per (layer, removed ratio)", "",
              "Share of (layer, grid removed ratio) pairs whose best ks (the one each cost picks) differs.", ""]
    rows = []
    for pair in div[seeds[0]]["best_ks"]:
        for seed in seeds:
            b = div[seed]["best_ks"][pair]
            rows.append([pair.replace("|", " vs "), seed, str(b["n_pairs"]), str(b["n_differ"]),
                         f"{100 * b['share']:.1f}%", f"{100 * b['share_with_choice']:.1f}%"])
    lines += _table(["costs", "seed", "(layer, ratio) pairs", "best ks differs", "share",
                     "share where >1 ks is valid"], rows)
    lines += ["", "### Layers allocated differently", "",
              "*another candidate*: another removed ratio or ks (or dense); *another size*: another removed ratio "
              "(or dense vs compressed).", ""]
    rows = []
    for rk, pairs in div[seeds[0]]["allocation_differences"].items():
        for pair in pairs:
            for seed in seeds:
                d = div[seed]["allocation_differences"][rk][pair]
                rows.append([rk, pair.replace("|", " vs "), seed, f"{d['n_differ']} / {d['n_layers']}",
                             f"{d['n_differ_ratio']} / {d['n_layers']}", f"{d['mean_abs_kept_diff']:.4f}"])
    lines += _table(["removed", "costs", "seed", "another candidate", "another size", "mean abs kept diff"], rows)
    seed = seeds[0]
    for rk, pairs in div[seed]["allocation_differences"].items():
        for pair, d in pairs.items():
            if not d["layers"]:
                continue
            shown = d["layers"][:MAX_LISTED_LAYERS]
            a, b = pair.split("|")
            items = "; ".join(f"`{x['name']}` {_choice(x['a'])} → {_choice(x['b'])}" for x in shown)
            more = f"; … and {len(d['layers']) - len(shown)} more (study.json)" if len(d["layers"]) > len(shown) else ""
            lines += ["", f"Removed ratio {rk}, {a} → {b} (seed {seed}): {items}{more}."]
    lines += _sweep_lines(study)
    return lines


def _choice(c: dict) -> str:
    return "dense" if c["dense"] else f"r{c['removed_ratio']:g}/ks{c['ks']:g}"


def _sweep_lines(study: dict) -> list[str]:
    sweeps = study["sweep"]
    points = list(sweeps.values())[0] if sweeps else []
    if not points:
        return []
    pairs = list(dict.fromkeys(p for pts in sweeps.values() for pt in pts for p in pt["pairs"]))
    lines = ["", "### Allocation divergence vs target ratio (allocation only)", "",
             f"Share of layers allocated to another candidate, mean over {len(sweeps)} seed(s); "
             "`infeasible`: the grid cannot reach that ratio.", ""]
    rows = []
    for i, pt in enumerate(points):
        row = [f"{pt['ratio']:g}"]
        for pair in pairs:
            vals = [pts[i]["pairs"][pair]["share_differ"] for pts in sweeps.values() if pair in pts[i]["pairs"]]
            row.append(f"{100 * _mean_over_seeds(vals):.1f}%" if vals else "infeasible")
        rows.append(row)
    lines += _table(["target removed"] + [p.replace("|", " vs ") for p in pairs], rows)
    return lines


def _section_figures(study: dict) -> list[str]:
    captions = {"metrics_vs_ratio": "Accuracy and perplexity vs removed ratio (mean ± std over seeds)",
                "error_scatter": "Weight vs output error of every profiled candidate (first seed)",
                "spearman_hist": "Per-layer Spearman correlation of the two errors (first seed)",
                "divergence_sweep": "Allocation divergence between costs vs target ratio"}
    lines = ["## 4. Figures", ""]
    for name, path in study.get("figures", {}).items():
        if name.startswith("heatmap_"):
            caption = f"Allocation heatmap (decoder layer x projection, kept fraction), removed {name[8:].replace('p', '.')}"
        elif name.startswith("kept_per_layer_"):
            caption = f"Per-layer kept fraction under each cost, removed {name[15:].replace('p', '.')}"
        else:
            caption = captions.get(name, name)
        lines += [f"- {caption}: [{path}]({path})", "", f"  ![{caption}]({path})", ""]
    return lines


def _overhead(runtime: dict, ref: str, other: str) -> dict | None:
    per = runtime["per_cost"]
    if ref not in per or other not in per:
        return None
    t_ref = per[ref]["allocation"] + per[ref]["compression"]
    t_other = per[other]["allocation"] + per[other]["compression"]
    overhead = t_other - t_ref > max(OVERHEAD_REL * t_ref, OVERHEAD_ABS_S)
    return {"ref_s": t_ref, "other_s": t_other, "relative": t_other / t_ref - 1.0 if t_ref > 0 else 0.0,
            "overhead": overhead}


def _section_runtime(study: dict) -> list[str]:
    rt = study["runtime"]
    lines = ["## 5. Runtime", "",
             "Calibration and profiling run once per seed, in its first compression call, and serve every cost and "
             "ratio: both errors of every candidate come out of that one pass, so no cost adds profiling work. "
             "Fresh pass per seed: "
             + "; ".join(f"seed {seed}: calibration {v['calibration']:.2f} s + profiling {v['profiling']:.2f} s"
                         for seed, v in rt["profiling_per_seed"].items())
             + " (about 0 s means the cache already held them before this study).", "",
             "Per cost, mean wall seconds per run (over seeds x ratios) of the stages that depend on the cost:", ""]
    rows = []
    for cost, s in rt["per_cost"].items():
        rows.append([cost, _f(s["allocation"], ".3f"), _f(s["solve"], ".3f"), _f(s["compression"]),
                     _f(s["perplexity"]), _f(s["zeroshot"]), str(s["n_runs"])])
    lines += _table(["cost", "allocation", "knapsack solve", "compression", "perplexity eval", "zero-shot eval",
                     "runs"], rows)
    lines.append("")
    if rt.get("sweep_solve_seconds"):
        lines.append("Allocation-only sweep, mean knapsack time per ratio: "
                     + ", ".join(f"{c} {s:.3f} s" for c, s in rt["sweep_solve_seconds"].items()) + ".")
        lines.append("")
    ref = study["reference_cost"]
    for other in study["config"]["costs"]:
        if other == ref:
            continue
        o = _overhead(rt, ref, other)
        if o:
            lines.append(f"- {other} vs {ref}: allocation + compression {o['other_s']:.2f} s vs {o['ref_s']:.2f} s "
                         f"({100 * o['relative']:+.1f}%): "
                         + ("**overhead**" if o["overhead"] else "no overhead beyond timing noise")
                         + f" (noise allowance: {int(100 * OVERHEAD_REL)}% or {OVERHEAD_ABS_S} s; compression time "
                         "also depends on which layers the allocation compresses).")
    return lines


# --------------------------------------------------------------------------- the paper's claims

def _direction(ci: dict | None, expected_sign: int) -> str:
    if ci is None:
        return "not measured"
    same = (ci["mean_diff"] > 0) == (expected_sign > 0) and ci["mean_diff"] != 0
    if ci["significant"]:
        return "agrees (significant)" if same else "contradicts (significant, opposite sign)"
    return "same direction, not significant" if same else "opposite direction, not significant"


def _similar_share(ours: float | None, paper: float) -> str:
    if ours is None:
        return "not measured"
    if abs(ours - paper) <= SIMILAR_SHARE:
        return "similar"
    return "higher than the paper" if ours > paper else "lower than the paper"


def paper_comparison(study: dict) -> list[dict]:
    """One row per claim of the paper: what it reported, what this study measured, and a verdict."""
    costs = study["config"]["costs"]
    rows: list[dict] = []
    if "weight" not in costs or "output" not in costs:
        return [{"claim": "all claims compare the weight and output costs", "paper": "-",
                 "study": "weight and output were not both studied", "verdict": "not measured"}]
    stats = study["statistics"]
    ratios = [float(r) for r in stats]
    hi = _nearest(ratios, PAPER["high_ratio"])
    lo = _nearest([r for r in ratios if r != hi], PAPER["low_ratio"])

    def entry(r):
        return stats.get(ratio_key(r), {}).get("weight|output") if r is not None else None

    e_hi = entry(hi)
    avg = e_hi.get("average") if e_hi else None
    rows.append({"claim": f"output cost raises average accuracy under aggressive compression (removed {hi:g} here)",
                 "paper": f"+{PAPER['acc_diff_pp']} pp (Qwen3-8B, 50%)",
                 "study": f"{_pp(avg['mean_diff'])} pp, CI {_ci_pp(avg)}" if avg else "not measured (--tasks none)",
                 "verdict": _direction(avg, +1)})
    ppl_ci = _ppl_ci(e_hi)
    rows.append({"claim": f"output cost worsens perplexity under aggressive compression (removed {hi:g} here)",
                 "paper": f"+{100 * PAPER['ppl_rel']:.0f}% (52.98 → 61.46)",
                 "study": _ppl_text(e_hi), "verdict": _direction(ppl_ci, +1)})
    if lo is not None:
        e_lo = entry(lo)
        avg_lo, ppl_lo = (e_lo or {}).get("average"), _ppl_ci(e_lo)
        measured = [c for c in (avg_lo, ppl_lo) if c is not None]
        verdict = ("not measured" if not measured else
                   "agrees (no significant difference)" if not any(c["significant"] for c in measured) else
                   "differs: " + ", ".join(n for n, c in (("accuracy", avg_lo), ("perplexity", ppl_lo))
                                           if c is not None and c["significant"]) + " differ significantly")
        rows.append({"claim": f"near-identical results at mild compression (removed {lo:g} here)",
                     "paper": f"{PAPER['low_acc_diff_pp']:+.1f} pp, {100 * PAPER['low_ppl_rel']:+.1f}% PPL "
                              "(Llama-3.2-1B, 20%, one seed)",
                     "study": (f"{_pp(avg_lo['mean_diff'])} pp, CI {_ci_pp(avg_lo)}; " if avg_lo else "")
                     + _ppl_text(e_lo), "verdict": verdict})
    div = study["divergence"]
    shares = [d["correlation_summary"].get("share_above") for d in div.values()]
    medians = [d["correlation_summary"].get("median") for d in div.values()]
    mins = [d["correlation_summary"].get("min") for d in div.values()]
    if None not in shares:
        share = _mean_over_seeds(shares)
        verdict = ("agrees" if share >= 0.9 else "partly (median above 0.99)" if _mean_over_seeds(medians) > 0.99
                   else "differs")
        rows.append({"claim": "per-layer Spearman(weight error, output error) > 0.99 for nearly all layers",
                     "paper": "> 0.99 for nearly all layers (Qwen3-8B)",
                     "study": f"{100 * share:.1f}% of layers > 0.99; median {_mean_over_seeds(medians):.4f}, "
                              f"min {min(mins):.4f}", "verdict": verdict})
    if hi is not None:
        diffs = [d["allocation_differences"].get(ratio_key(hi), {}).get("weight|output") for d in div.values()]
        diffs = [d for d in diffs if d]
        if diffs:
            share = _mean_over_seeds([d["share_differ"] for d in diffs])
            n = diffs[0]["n_layers"]
            paper_share = PAPER["layers_differ"][0] / PAPER["layers_differ"][1]
            rows.append({"claim": f"about 70 of 252 layers allocated differently (removed {hi:g} here)",
                         "paper": f"70 / 252 ({100 * paper_share:.0f}%)",
                         "study": f"{_mean_over_seeds([d['n_differ'] for d in diffs]):.1f} / {n} "
                                  f"({100 * share:.1f}%), {_mean_over_seeds([d['n_differ_ratio'] for d in diffs]):.1f}"
                                  " with another size",
                         "verdict": _similar_share(share, paper_share)})
    ks = [d["best_ks"].get("weight|output", {}).get("share") for d in div.values()]
    if ks and None not in ks:
        share = _mean_over_seeds(ks)
        rows.append({"claim": "(layer, ratio) pairs with a different best ks", "paper": "96.6%",
                     "study": f"{100 * share:.1f}%", "verdict": _similar_share(share, PAPER["best_ks_share"])})
    o = _overhead(study["runtime"], "weight", "output")
    if o:
        rows.append({"claim": "the output cost adds no runtime overhead", "paper": "none (ActCost 7.7% faster)",
                     "study": f"allocation + compression {100 * o['relative']:+.1f}% vs weight; profiling shared",
                     "verdict": "contradicts (overhead)" if o["overhead"] else "agrees"})
    return rows


def _ppl_ci(entry: dict | None) -> dict | None:
    if not entry:
        return None
    ppl = entry["perplexity"]
    ci = ppl.get("log_ratio_ci")
    return ci if ci else None


def _ppl_text(entry: dict | None) -> str:
    if not entry:
        return "not measured"
    ppl = entry["perplexity"]
    per_seed = [b / a - 1.0 for a, b in zip(ppl["reference"], ppl["other"])]
    seeds = ", ".join(f"{100 * d:+.1f}%" for d in per_seed)
    mixed = len(per_seed) > 1 and min(per_seed) < 0 < max(per_seed)
    ci = ppl.get("ratio_ci")
    if ci:
        # the verdict is taken from this ratio (pooled mean NLL difference), so it leads the text
        text = (f"PPL ratio {ci['ratio']:.3f} ({100 * (ci['ratio'] - 1):+.1f}%), CI [{ci['low']:.3f}, {ci['high']:.3f}]"
                f"; per seed {seeds}")
    else:
        text = f"{100 * ppl['relative_diff']['mean']:+.2f}% PPL (mean over seeds; per seed {seeds})"
    return text + ("; the seeds disagree in sign" if mixed else "")


def _section_paper(study: dict) -> list[str]:
    rows = [[r["claim"], r["paper"], r["study"], r["verdict"]] for r in study.get("paper_comparison", [])]
    return ["## 6. Comparison with the ActCost paper's claims", "",
            "Filled in from this study's data; *significant* means the confidence interval of section 2 excludes 0. "
            "The paper's numbers come from other models (Qwen3-8B, Llama-3.2-1B), single or two seeds and no test.",
            ""] + _table(["claim", "paper", "this study", "verdict"], rows)


def _header(study: dict) -> list[str]:
    cfg = study["config"]
    rocket = cfg["rocket"]
    grid = rocket["grid"]
    tasks = ", ".join(cfg["task_names"]) or "none (perplexity only)"
    lines = [f"# Allocation-cost study: `{cfg['model']}`", "",
             f"- removed ratios: {', '.join(f'{r:g}' for r in cfg['ratios'])}; seeds: "
             f"{', '.join(map(str, cfg['seeds']))}; costs: {', '.join(cfg['costs'])} "
             f"(reference: {study['reference_cost']})",
             f"- calibration: {rocket['calib_samples']} windows x {rocket['calib_seq_len']} tokens per seed; grid: "
             f"removed {min(grid['removed_ratios']):g}..{max(grid['removed_ratios']):g} ({len(grid['removed_ratios'])} "
             f"ratios) x ks {min(grid['ks']):g}..{max(grid['ks']):g} ({len(grid['ks'])} values); budget counted in "
             f"{rocket['budget_count']}",
             f"- evaluation: WikiText-2 perplexity ({cfg['ppl_seq_len']}-token windows"
             + (f", first {cfg['ppl_limit']}" if cfg["ppl_limit"] else ", all") + "); zero-shot tasks: " + tasks
             + (f" (first {cfg['limit']} documents each)" if cfg["limit"] and cfg["task_names"] else ""),
             f"- sweep (allocation only): {', '.join(f'{r:g}' for r in cfg['sweep_ratios'])}", "",
             "Costs:", ""]
    lines += [f"- `{name}`: {desc}" for name, desc in study["costs"].items()]
    return lines + [""]


def render_report(study: dict) -> str:
    """The whole ``report.md``."""
    sections = [_header(study), _section_main(study), [""], _section_statistics(study),
                _section_divergence(study), [""], _section_figures(study), _section_runtime(study), [""],
                _section_paper(study),
                ["", "Data: `study.json` (everything above, machine-readable); `runs/*.json` (each run with its "
                     "per-example correctness and per-window NLL); `profiles/seed*.jsonl` (every candidate's errors)."]]
    return "\n".join(line for section in sections for line in section) + "\n"
