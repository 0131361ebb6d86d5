"""``report.md`` of the study: tables, plain-language statistics, divergence analysis, runtime,
and how the findings compare with the ActCost paper's claims (computed from the data).

Everything is drawn from the typed :class:`rocketlm.study.result.StudyResult`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from rocketlm.study.analysis import CostPair, SeedDivergence, pair_label
from rocketlm.study.compare import MainRow, PairComparison, PerplexityComparison, Runtime
from rocketlm.study.stats import BootstrapCI, MeanStd

if TYPE_CHECKING:
    from rocketlm.study.result import StudyResult

SIMILAR_SHARE = 0.10  # shares within 10 percentage points of the paper's count as similar
OVERHEAD_REL, OVERHEAD_ABS_S = 0.10, 0.05  # timing noise allowance for "no overhead"
MAX_LISTED_LAYERS = 40


@dataclass(frozen=True)
class PaperNumbers:
    """The ActCost paper's claims (arXiv 2606.27785), as published; compared with the data in paper_comparison()."""

    high_ratio: float = 0.5  # "aggressive compression" (Qwen3-8B)
    acc_diff_pp: float = 0.8  # average accuracy, output minus weight, at high_ratio
    ppl_rel: float = 61.46 / 52.98 - 1.0  # relative perplexity change at high_ratio
    low_ratio: float = 0.2  # "mild compression" (Llama-3.2-1B)
    low_acc_diff_pp: float = -0.2
    low_ppl_rel: float = 14.45 / 14.66 - 1.0
    spearman: float = 0.99  # per-layer correlation of the two errors, "nearly all layers" above
    layers_differ: tuple[int, int] = (70, 252)  # layers allocated differently / all layers
    best_ks_share: float = 0.966  # (layer, ratio) pairs with another best ks
    speedup: float = 0.077  # ActCost faster than ROCKET


PAPER = PaperNumbers()


@dataclass(frozen=True)
class PaperClaim:
    """One claim of the paper: what it reported, what this study measured, and a verdict."""

    claim: str
    paper: str
    study: str
    verdict: str

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- formatting

def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(entry: MeanStd | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    if not entry:
        return "-"
    mean = entry.mean * scale
    if entry.std is None:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(entry.std * scale, fmt)}"


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _ci_pp(ci: BootstrapCI) -> str:
    return f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]"


def _sig(flag: bool) -> str:
    return "**yes**" if flag else "no"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _nearest(ratios: Sequence[float], target: float) -> float | None:
    return min(ratios, key=lambda r: (abs(r - target), -r)) if ratios else None


def _diff_label(pair: CostPair) -> str:
    ref, other = pair
    return f"{other} − {ref}"


def _percent_of(confidence: float) -> int:
    return int(100 * confidence)


# --------------------------------------------------------------------------- sections

def format_main_table(study: StudyResult) -> str:
    """Markdown main table (also printed by the CLI)."""
    table = study.main_table
    has_acc = table.has_accuracy
    header = ["removed", "cost", "achieved removed (%)", "WikiText-2 PPL"] + (["avg acc (%)"] if has_acc else [])
    rows = []
    dense = table.dense
    if dense:
        rows.append(["0 (dense)", "-", "0", _f(dense.ppl)] + ([_f(_pct(dense.acc))] if has_acc else []))
    for r in table.rows:
        row = [f"{r.ratio:g}", r.cost, _ms(r.achieved_removed_ratio, 100), _ms(r.ppl)]
        if has_acc:
            row.append(_ms(r.acc, 100))
        rows.append(row)
    return "\n".join(_table(header, rows))


def _task_notes(study: StudyResult) -> dict[str, str]:
    notes = {}
    for record in study.runs[:1] + [study.dense]:
        zeroshot = record.evaluation.zeroshot
        for task, scores in (zeroshot.tasks if zeroshot else {}).items():
            if scores.note:
                notes[task] = scores.note
    return notes


def _task_table(study: StudyResult) -> list[str]:
    table = study.main_table
    tasks = list(dict.fromkeys(t for r in table.rows for t in r.tasks))
    if not tasks:
        return []
    notes = _task_notes(study)
    header = ["removed", "cost"] + [f"{t}*" if t in notes else t for t in tasks] + ["average"]
    rows = []
    dense = table.dense
    if dense and dense.tasks:
        rows.append(["0 (dense)", "-"] + [_f(_pct(dense.tasks.get(t))) for t in tasks] + [_f(_pct(dense.acc))])
    for r in table.rows:
        rows.append([f"{r.ratio:g}", r.cost] + [_ms(r.tasks.get(t), 100, ".1f") for t in tasks]
                    + [_ms(r.acc, 100, ".1f")])
    lines = ["", "Per-task accuracy (`acc`, %, mean ± std over seeds):", ""] + _table(header, rows)
    lines += [f"\n\\* {t}: {n}" for t, n in notes.items()]
    zeroshot = study.dense.evaluation.zeroshot
    lines += [f"\nNot evaluated: {t} ({why})" for t, why in (zeroshot.unavailable if zeroshot else {}).items()]
    return lines


def _section_main(study: StudyResult) -> list[str]:
    cfg = study.config
    return ["## 1. Main results", "",
            f"Mean ± sample std over {len(cfg.seeds)} seed(s) "
            f"({', '.join(map(str, cfg.seeds))}); the dense model on top. "
            "Average accuracy: " + ("unweighted mean of `acc` over the evaluated tasks." if cfg.task_names
                                    else "not measured (`--tasks none`)."), "",
            format_main_table(study)] + _task_table(study)


def _verdict_sentence(label: str, ci: BootstrapCI, other: str) -> str:
    if ci.significant:
        return (f"{label}: the difference is **significant** ({'higher' if ci.mean_diff > 0 else 'lower'} under "
                f"{other}; the {_percent_of(ci.confidence)}% CI excludes 0)")
    return f"{label}: the difference is **not significant** (the {_percent_of(ci.confidence)}% CI contains 0)"


def _ppl_lines(ppl: PerplexityComparison, ref: str, other: str) -> list[str]:
    diff, rel = ppl.diff, ppl.relative_diff
    per_seed = ", ".join(f"{b - a:+.3f}" for a, b in zip(ppl.reference_ppl, ppl.other_ppl))
    spread = "" if diff.std is None else f" ± {diff.std:.3f} (std over seeds)"
    rel_spread = "" if rel.std is None else f" ± {100 * rel.std:.2f}"
    lines = [f"- Perplexity: {ref} {np.mean(ppl.reference_ppl):.3f}, {other} {np.mean(ppl.other_ppl):.3f}; "
             f"difference {diff.mean:+.3f}{spread} (per seed: {per_seed}), relative "
             f"{100 * rel.mean:+.2f}%{rel_spread}."]
    ci = ppl.ratio_ci
    if ci:
        verdict = ("**significant**" if ci.significant else "**not significant**")
        direction = "" if not ci.significant else (" (worse under " + other + ")" if ci.ratio > 1
                                                   else " (better under " + other + ")")
        lines.append(f"- Perplexity ratio {other}/{ref} from a paired bootstrap over {ci.n_units} evaluation "
                     f"unit(s) per seed: {ci.ratio:.4f}, {_percent_of(ci.confidence)}% CI "
                     f"[{ci.low:.4f}, {ci.high:.4f}]: {verdict}{direction}.")
    elif diff.std is None:
        lines.append("- With one seed and no per-window data, no spread can be given for the perplexity difference.")
    return lines


def _ci_cells(ci: BootstrapCI) -> list[str]:
    return [_pp(ci.mean_diff), _ci_pp(ci), str(ci.n_examples), _sig(ci.significant)]


def _accuracy_rows(entry: PairComparison, ref_row: MainRow | None, other_row: MainRow | None) -> list[list[str]]:
    """Per task (and the average): both costs' accuracy over seeds and the paired difference's CI."""
    rows = []
    for task, ci in entry.tasks.items():
        rows.append([task, _ms(ref_row.tasks.get(task) if ref_row else None, 100),
                     _ms(other_row.tasks.get(task) if other_row else None, 100)] + _ci_cells(ci))
    if entry.average:
        rows.append(["**average**", _ms(ref_row.acc if ref_row else None, 100),
                     _ms(other_row.acc if other_row else None, 100)] + _ci_cells(entry.average))
    return rows


def _pair_lines(study: StudyResult, ratio: float, entry: PairComparison) -> list[str]:
    """One comparison at one ratio: the accuracy table, the perplexity lines, a plain summary."""
    ref, other = entry.reference, entry.other
    lines = [f"**{_diff_label((ref, other))}** (seeds {', '.join(map(str, entry.seeds))})", ""]
    summary = []
    if entry.tasks:
        rows = _accuracy_rows(entry, study.main_table.row(ratio, ref), study.main_table.row(ratio, other))
        if entry.average:
            ci = entry.average
            summary.append(_verdict_sentence(f"average accuracy {_pp(ci.mean_diff)} pp (CI {_ci_pp(ci)})", ci, other))
        lines += _table(["task", f"{ref} acc (%)", f"{other} acc (%)", "diff (pp)",
                         f"{_percent_of(study.config.confidence)}% CI (pp)", "examples", "significant"], rows)
        n_sig = sum(ci.significant for ci in entry.tasks.values())
        summary.append(f"{n_sig} of {len(entry.tasks)} task(s) differ significantly")
        lines.append("")
    lines += _ppl_lines(entry.perplexity, ref, other)
    ppl_ci = entry.perplexity.ratio_ci
    if ppl_ci:
        rel = 100 * (ppl_ci.ratio - 1.0)  # the statistic the verdict is about
        summary.append(f"perplexity {rel:+.2f}% (bootstrap ratio): the difference is "
                       + ("**significant**" if ppl_ci.significant else "**not significant**"))
    if summary:
        lines.append(f"- In plain words, at removed ratio {ratio:g}: " + "; ".join(summary) + ".")
    return lines + [""]


def _section_statistics(study: StudyResult) -> list[str]:
    cfg = study.config
    lines = ["## 2. Statistics: are the differences real?", "",
             f"Differences are *other cost minus {study.reference_cost}*, accuracy in percentage points (pp). "
             f"Confidence intervals: {_percent_of(cfg.confidence)}% paired percentile bootstrap "
             f"({cfg.n_boot} resamples) over the evaluation examples, the same resample for every seed "
             "(all seeds score the same documents), averaging the seeds' paired differences"
             + ("; seeds are resampled too (3 or more seeds)" if len(cfg.seeds) >= 3 else "")
             + ". The average-accuracy CI resamples every task's examples and averages the tasks with equal "
             "weight, like the headline average. A difference is significant when its CI excludes 0.", ""]
    if not study.statistics:
        return lines + ["Only one cost was studied: nothing to compare.", ""]
    for ratio, pairs in study.statistics.items():
        lines += [f"### Removed ratio {ratio:g}", ""]
        for entry in pairs.values():
            lines += _pair_lines(study, ratio, entry)
    return lines


def _mean_over_seeds(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _correlation_lines(div: dict[int, SeedDivergence]) -> list[str]:
    seeds = list(div)
    first = div[seeds[0]]
    lines = ["### Error correlation across candidates", "",
             "Per layer, Spearman rank correlation between the weight-space and the output-space error over "
             "that layer's profiled candidates (every removed ratio x ks of the grid).", ""]
    rows = []
    for seed in seeds:
        s = div[seed].correlation_summary
        share = 100 * (s.share_above or 0.0)
        rows.append([str(seed), str(s.n_defined), _f(s.min, ".4f"), _f(s.median, ".4f"), _f(s.mean, ".4f"),
                     f"{s.n_above} ({_f(share, '.1f')}%)"])
    lines += _table(["seed", "layers", "min", "median", "mean", f"> {first.correlation_summary.threshold}"], rows)
    lowest = sorted((r.spearman, r.name) for r in first.correlations if r.spearman is not None)[:5]
    if lowest:
        lines += ["", f"Lowest correlations (seed {seeds[0]}): "
                  + ", ".join(f"`{name}` {rho:.4f}" for rho, name in lowest) + "."]
    return lines


def _best_ks_lines(div: dict[int, SeedDivergence]) -> list[str]:
    seeds = list(div)
    lines = ["", "### Best ks per (layer, removed ratio)", "",
             "Share of (layer, grid removed ratio) pairs whose best ks (the one each cost picks) differs.", ""]
    rows = []
    for pair in div[seeds[0]].best_ks:
        for seed in seeds:
            b = div[seed].best_ks[pair]
            rows.append([pair_label(pair), str(seed), str(b.n_pairs), str(b.n_differ), f"{100 * b.share:.1f}%",
                         f"{100 * b.share_with_choice:.1f}%"])
    return lines + _table(["costs", "seed", "(layer, ratio) pairs", "best ks differs", "share",
                           "share where >1 ks is valid"], rows)


def _allocation_difference_lines(div: dict[int, SeedDivergence]) -> list[str]:
    seeds = list(div)
    lines = ["", "### Layers allocated differently", "",
             "*another candidate*: another removed ratio or ks (or dense); *another size*: another removed ratio "
             "(or dense vs compressed).", ""]
    rows = []
    for ratio, pairs in div[seeds[0]].allocation_differences.items():
        for pair in pairs:
            for seed in seeds:
                d = div[seed].allocation_differences[ratio][pair]
                rows.append([f"{ratio:g}", pair_label(pair), str(seed), f"{d.n_differ} / {d.n_layers}",
                             f"{d.n_differ_ratio} / {d.n_layers}", f"{d.mean_abs_kept_diff:.4f}"])
    lines += _table(["removed", "costs", "seed", "another candidate", "another size", "mean abs kept diff"], rows)
    seed = seeds[0]
    for ratio, pairs in div[seed].allocation_differences.items():
        for (a, b), d in pairs.items():
            if not d.layers:
                continue
            shown = d.layers[:MAX_LISTED_LAYERS]
            items = "; ".join(f"`{x.name}` {x.a.describe()} → {x.b.describe()}" for x in shown)
            more = f"; … and {len(d.layers) - len(shown)} more (study.json)" if len(d.layers) > len(shown) else ""
            lines += ["", f"Removed ratio {ratio:g}, {a} → {b} (seed {seed}): {items}{more}."]
    return lines


def _section_divergence(study: StudyResult) -> list[str]:
    div = study.divergence
    return (["## 3. Why the costs agree or not", ""] + _correlation_lines(div) + _best_ks_lines(div)
            + _allocation_difference_lines(div) + _sweep_lines(study))


def _sweep_lines(study: StudyResult) -> list[str]:
    sweeps = study.sweep
    points = list(sweeps.values())[0] if sweeps else []
    if not points:
        return []
    pairs = list(dict.fromkeys(p for pts in sweeps.values() for pt in pts for p in pt.pairs))
    lines = ["", "### Allocation divergence vs target ratio (allocation only)", "",
             f"Share of layers allocated to another candidate, mean over {len(sweeps)} seed(s); "
             "`infeasible`: the grid cannot reach that ratio.", ""]
    rows = []
    for i, pt in enumerate(points):
        row = [f"{pt.ratio:g}"]
        for pair in pairs:
            vals = [pts[i].pairs[pair].share_differ for pts in sweeps.values() if pair in pts[i].pairs]
            row.append(f"{100 * _mean_over_seeds(vals):.1f}%" if vals else "infeasible")
        rows.append(row)
    return lines + _table(["target removed"] + [pair_label(p) for p in pairs], rows)


FIGURE_CAPTIONS = {"metrics_vs_ratio": "Accuracy and perplexity vs removed ratio (mean ± std over seeds)",
                   "error_scatter": "Weight vs output error of every profiled candidate (first seed)",
                   "spearman_hist": "Per-layer Spearman correlation of the two errors (first seed)",
                   "divergence_sweep": "Allocation divergence between costs vs target ratio"}


def _caption(name: str) -> str:
    if name.startswith("heatmap_"):
        ratio = name.removeprefix("heatmap_").replace("p", ".")
        return f"Allocation heatmap (decoder layer x projection, kept fraction), removed {ratio}"
    if name.startswith("kept_per_layer_"):
        ratio = name.removeprefix("kept_per_layer_").replace("p", ".")
        return f"Per-layer kept fraction under each cost, removed {ratio}"
    return FIGURE_CAPTIONS.get(name, name)


def _section_figures(study: StudyResult) -> list[str]:
    lines = ["## 4. Figures", ""]
    for name, path in study.figures.items():
        caption = _caption(name)
        lines += [f"- {caption}: [{path}]({path})", "", f"  ![{caption}]({path})", ""]
    return lines


@dataclass(frozen=True)
class Overhead:
    """Allocation + compression seconds of a cost against the reference's."""

    ref_seconds: float
    other_seconds: float
    relative: float
    overhead: bool  # beyond the timing-noise allowance


def _overhead(runtime: Runtime, ref: str, other: str) -> Overhead | None:
    per = runtime.per_cost
    if ref not in per or other not in per:
        return None
    t_ref = per[ref].allocation_seconds + per[ref].compression_seconds
    t_other = per[other].allocation_seconds + per[other].compression_seconds
    return Overhead(t_ref, t_other, t_other / t_ref - 1.0 if t_ref > 0 else 0.0,
                    t_other - t_ref > max(OVERHEAD_REL * t_ref, OVERHEAD_ABS_S))


def _runtime_table(rt: Runtime) -> list[str]:
    rows = [[cost, _f(s.allocation_seconds, ".3f"), _f(s.solve_seconds, ".3f"), _f(s.compression_seconds),
             _f(s.perplexity_seconds), _f(s.zeroshot_seconds), str(s.n_runs)] for cost, s in rt.per_cost.items()]
    lines = _table(["cost", "allocation", "knapsack solve", "compression", "perplexity eval", "zero-shot eval",
                    "runs"], rows) + [""]
    if rt.sweep_solve_seconds:
        lines += ["Allocation-only sweep, mean knapsack time per ratio: "
                  + ", ".join(f"{c} {s:.3f} s" for c, s in rt.sweep_solve_seconds.items()) + ".", ""]
    return lines


def _section_runtime(study: StudyResult) -> list[str]:
    rt = study.runtime
    lines = ["## 5. Runtime", "",
             "Calibration and profiling run once per seed, in its first compression call, and serve every cost and "
             "ratio: both errors of every candidate come out of that one pass, so no cost adds profiling work. "
             "Fresh pass per seed: "
             + "; ".join(f"seed {seed}: calibration {t.calibration_seconds:.2f} s + profiling "
                         f"{t.profiling_seconds:.2f} s" for seed, t in rt.profiling_per_seed.items())
             + " (about 0 s means the cache already held them before this study).", "",
             "Per cost, mean wall seconds per run (over seeds x ratios) of the stages that depend on the cost:", ""]
    lines += _runtime_table(rt)
    ref = study.reference_cost
    for other in study.config.costs:
        o = _overhead(rt, ref, other) if other != ref else None
        if o:
            lines.append(f"- {other} vs {ref}: allocation + compression {o.other_seconds:.2f} s vs "
                         f"{o.ref_seconds:.2f} s ({100 * o.relative:+.1f}%): "
                         + ("**overhead**" if o.overhead else "no overhead beyond timing noise")
                         + f" (noise allowance: {int(100 * OVERHEAD_REL)}% or {OVERHEAD_ABS_S} s; compression time "
                         "also depends on which layers the allocation compresses).")
    return lines


# --------------------------------------------------------------------------- the paper's claims

WEIGHT_OUTPUT: CostPair = ("weight", "output")


def _direction(ci: BootstrapCI | None, expected_sign: int) -> str:
    if ci is None:
        return "not measured"
    same = (ci.mean_diff > 0) == (expected_sign > 0) and ci.mean_diff != 0
    if ci.significant:
        return "agrees (significant)" if same else "contradicts (significant, opposite sign)"
    return "same direction, not significant" if same else "opposite direction, not significant"


def _similar_share(ours: float | None, paper: float) -> str:
    if ours is None:
        return "not measured"
    if abs(ours - paper) <= SIMILAR_SHARE:
        return "similar"
    return "higher than the paper" if ours > paper else "lower than the paper"


def _ppl_ci(entry: PairComparison | None) -> BootstrapCI | None:
    return entry.perplexity.log_ratio_ci if entry else None


def _ppl_text(entry: PairComparison | None) -> str:
    if not entry:
        return "not measured"
    ppl = entry.perplexity
    per_seed = [b / a - 1.0 for a, b in zip(ppl.reference_ppl, ppl.other_ppl)]
    seeds = ", ".join(f"{100 * d:+.1f}%" for d in per_seed)
    mixed = len(per_seed) > 1 and min(per_seed) < 0 < max(per_seed)
    ci = ppl.ratio_ci
    if ci:
        # the verdict is taken from this ratio (pooled mean NLL difference), so it leads the text
        text = (f"PPL ratio {ci.ratio:.3f} ({100 * (ci.ratio - 1):+.1f}%), CI [{ci.low:.3f}, {ci.high:.3f}]"
                f"; per seed {seeds}")
    else:
        text = f"{100 * ppl.relative_diff.mean:+.2f}% PPL (mean over seeds; per seed {seeds})"
    return text + ("; the seeds disagree in sign" if mixed else "")


def _weight_vs_output(study: StudyResult, ratio: float | None) -> PairComparison | None:
    return study.statistics.get(ratio, {}).get(WEIGHT_OUTPUT) if ratio is not None else None


def _high_ratio_claims(study: StudyResult, hi: float) -> list[PaperClaim]:
    entry = _weight_vs_output(study, hi)
    avg = entry.average if entry else None
    return [
        PaperClaim(f"output cost raises average accuracy under aggressive compression (removed {hi:g} here)",
                   f"+{PAPER.acc_diff_pp} pp (Qwen3-8B, 50%)",
                   f"{_pp(avg.mean_diff)} pp, CI {_ci_pp(avg)}" if avg else "not measured (--tasks none)",
                   _direction(avg, +1)),
        PaperClaim(f"output cost worsens perplexity under aggressive compression (removed {hi:g} here)",
                   f"+{100 * PAPER.ppl_rel:.0f}% (52.98 → 61.46)", _ppl_text(entry),
                   _direction(_ppl_ci(entry), +1)),
    ]


def _low_ratio_claim(study: StudyResult, lo: float) -> PaperClaim:
    entry = _weight_vs_output(study, lo)
    avg, ppl = (entry.average if entry else None), _ppl_ci(entry)
    measured = [c for c in (avg, ppl) if c is not None]
    if not measured:
        verdict = "not measured"
    elif not any(c.significant for c in measured):
        verdict = "agrees (no significant difference)"
    else:
        verdict = "differs: " + ", ".join(n for n, c in (("accuracy", avg), ("perplexity", ppl))
                                          if c is not None and c.significant) + " differ significantly"
    return PaperClaim(f"near-identical results at mild compression (removed {lo:g} here)",
                      f"{PAPER.low_acc_diff_pp:+.1f} pp, {100 * PAPER.low_ppl_rel:+.1f}% PPL "
                      "(Llama-3.2-1B, 20%, one seed)",
                      (f"{_pp(avg.mean_diff)} pp, CI {_ci_pp(avg)}; " if avg else "") + _ppl_text(entry), verdict)


def _correlation_claim(study: StudyResult) -> list[PaperClaim]:
    summaries = [d.correlation_summary for d in study.divergence.values()]
    seeds = [(s.share_above, s.median, s.min) for s in summaries
             if s.share_above is not None and s.median is not None and s.min is not None]
    if not seeds or len(seeds) != len(summaries):  # a seed without any defined correlation
        return []
    share = _mean_over_seeds([share for share, _, _ in seeds])
    median = _mean_over_seeds([median for _, median, _ in seeds])
    verdict = "agrees" if share >= 0.9 else "partly (median above 0.99)" if median > 0.99 else "differs"
    return [PaperClaim("per-layer Spearman(weight error, output error) > 0.99 for nearly all layers",
                       "> 0.99 for nearly all layers (Qwen3-8B)",
                       f"{100 * share:.1f}% of layers > 0.99; median {median:.4f}, "
                       f"min {min(lowest for _, _, lowest in seeds):.4f}", verdict)]


def _layers_differ_claim(study: StudyResult, hi: float | None) -> list[PaperClaim]:
    if hi is None:
        return []
    found = [d.allocation_differences.get(hi, {}).get(WEIGHT_OUTPUT) for d in study.divergence.values()]
    diffs = [d for d in found if d is not None]
    if not diffs:
        return []
    share = _mean_over_seeds([d.share_differ for d in diffs])
    paper_share = PAPER.layers_differ[0] / PAPER.layers_differ[1]
    return [PaperClaim(f"about 70 of 252 layers allocated differently (removed {hi:g} here)",
                       f"70 / 252 ({100 * paper_share:.0f}%)",
                       f"{_mean_over_seeds([d.n_differ for d in diffs]):.1f} / {diffs[0].n_layers} "
                       f"({100 * share:.1f}%), {_mean_over_seeds([d.n_differ_ratio for d in diffs]):.1f}"
                       " with another size", _similar_share(share, paper_share))]


def _best_ks_and_runtime_claims(study: StudyResult) -> list[PaperClaim]:
    claims = []
    found = [d.best_ks.get(WEIGHT_OUTPUT) for d in study.divergence.values()]
    ks = [k for k in found if k is not None]
    if ks and len(ks) == len(found):
        share = _mean_over_seeds([k.share for k in ks])
        claims.append(PaperClaim("(layer, ratio) pairs with a different best ks", "96.6%", f"{100 * share:.1f}%",
                                 _similar_share(share, PAPER.best_ks_share)))
    o = _overhead(study.runtime, *WEIGHT_OUTPUT)
    if o:
        claims.append(PaperClaim("the output cost adds no runtime overhead", "none (ActCost 7.7% faster)",
                                 f"allocation + compression {100 * o.relative:+.1f}% vs weight; profiling shared",
                                 "contradicts (overhead)" if o.overhead else "agrees"))
    return claims


def paper_comparison(study: StudyResult) -> list[PaperClaim]:
    """One row per claim of the paper: what it reported, what this study measured, and a verdict."""
    costs = study.config.costs
    if "weight" not in costs or "output" not in costs:
        return [PaperClaim("all claims compare the weight and output costs", "-",
                           "weight and output were not both studied", "not measured")]
    ratios = list(study.statistics)
    hi = _nearest(ratios, PAPER.high_ratio)
    lo = _nearest([r for r in ratios if r != hi], PAPER.low_ratio)
    claims = _high_ratio_claims(study, hi) if hi is not None else []
    if lo is not None:
        claims.append(_low_ratio_claim(study, lo))
    return (claims + _correlation_claim(study) + _layers_differ_claim(study, hi)
            + _best_ks_and_runtime_claims(study))


def _section_paper(study: StudyResult) -> list[str]:
    rows = [[c.claim, c.paper, c.study, c.verdict] for c in study.paper_comparison]
    return ["## 6. Comparison with the ActCost paper's claims", "",
            "Filled in from this study's data; *significant* means the confidence interval of section 2 excludes 0. "
            "The paper's numbers come from other models (Qwen3-8B, Llama-3.2-1B), single or two seeds and no test.",
            ""] + _table(["claim", "paper", "this study", "verdict"], rows)


def _header(study: StudyResult) -> list[str]:
    cfg = study.config
    rocket, grid = cfg.rocket, cfg.rocket.grid
    tasks = ", ".join(cfg.task_names) or "none (perplexity only)"
    lines = [f"# Allocation-cost study: `{cfg.model}`", "",
             f"- removed ratios: {', '.join(f'{r:g}' for r in cfg.ratios)}; seeds: "
             f"{', '.join(map(str, cfg.seeds))}; costs: {', '.join(cfg.costs)} "
             f"(reference: {study.reference_cost})",
             f"- calibration: {rocket.calib_samples} windows x {rocket.calib_seq_len} tokens per seed; grid: "
             f"removed {min(grid.removed_ratios):g}..{max(grid.removed_ratios):g} ({len(grid.removed_ratios)} "
             f"ratios) x ks {min(grid.ks):g}..{max(grid.ks):g} ({len(grid.ks)} values); budget counted in "
             f"{rocket.budget_count}",
             f"- evaluation: WikiText-2 perplexity ({cfg.ppl_seq_len}-token windows"
             + (f", first {cfg.ppl_limit}" if cfg.ppl_limit else ", all") + "); zero-shot tasks: " + tasks
             + (f" (first {cfg.limit} documents each)" if cfg.limit and cfg.task_names else ""),
             f"- sweep (allocation only): {', '.join(f'{r:g}' for r in cfg.sweep_ratios)}", "",
             "Costs:", ""]
    lines += [f"- `{name}`: {desc}" for name, desc in study.cost_descriptions.items()]
    return lines + [""]


def render_report(study: StudyResult) -> str:
    """The whole ``report.md``."""
    sections = [_header(study), _section_main(study), [""], _section_statistics(study),
                _section_divergence(study), [""], _section_figures(study), _section_runtime(study), [""],
                _section_paper(study),
                ["", "Data: `study.json` (everything above, machine-readable); `runs/*.json` (each run with its "
                     "per-example correctness and per-window NLL); `profiles/seed*.jsonl` (every candidate's errors)."]]
    return "\n".join(line for section in sections for line in section) + "\n"
