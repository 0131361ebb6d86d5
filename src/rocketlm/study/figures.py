"""PNG figures of the study (matplotlib, Agg; no pyplot global state is touched).

:func:`make_figures` draws every figure from the assembled :class:`~rocketlm.study.result.StudyResult`
(plus the first seed's profiles for the error scatter) and returns ``{figure name: path relative to the
study dir}``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rocketlm.allocation.plan import Allocation
from rocketlm.profiling.profile import LayerProfile
from rocketlm.study.analysis import (HIGH_CORRELATION, CorrelationSummary, LayerCorrelation, kept_fraction,
                                     layer_position, pair_label)
from rocketlm.study.compare import MainRow
from rocketlm.study.stats import MeanStd

if TYPE_CHECKING:
    from rocketlm.study.result import StudyResult

log = logging.getLogger(__name__)

DPI = 120


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the study's figures need matplotlib: pip install 'rocketlm[study]' "
                          "(or pip install matplotlib)") from exc
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _ratio_tag(ratio: float) -> str:
    return f"{ratio:.2f}".replace(".", "p")


def _kept_by_name(alloc: Allocation) -> dict[str, float]:
    return {c.name: kept_fraction(c) for c in alloc.choices}


# --------------------------------------------------------------------------- individual figures

def allocation_heatmaps(study: StudyResult, ratio: float, seed: int, path: Path) -> None:
    """Decoder layer x projection grid of kept fractions, one panel per cost, side by side."""
    runs = study.runs_at(seed, ratio)
    costs = [c for c in study.config.costs if c in runs]
    names = study.layers
    blocks = sorted({b for b, _ in map(layer_position, names) if b is not None})
    projections = list(dict.fromkeys(p for b, p in map(layer_position, names) if b is not None))
    fig = _figure(1.2 + 2.6 * len(costs), 2.4 + 0.2 * max(len(blocks), 4))
    axes = fig.subplots(1, len(costs), squeeze=False)[0]
    image = None
    for ax, cost in zip(axes, costs):
        grid = np.full((len(blocks), len(projections)), np.nan)
        for name, kept in _kept_by_name(runs[cost].allocation).items():
            b, proj = layer_position(name)
            if b is not None:
                grid[blocks.index(b), projections.index(proj)] = kept
        image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        achieved = runs[cost].allocation.achieved_removed_ratio
        ax.set_title(f"{cost} (removed {100 * achieved:.1f}%)", fontsize=9)
        ax.set_xticks(range(len(projections)))
        ax.set_xticklabels([p.rsplit(".", 1)[-1] for p in projections], rotation=60, fontsize=7)
        step = max(1, len(blocks) // 16)
        ax.set_yticks(range(0, len(blocks), step))
        ax.set_yticklabels([str(b) for b in blocks[::step]], fontsize=7)
        ax.set_ylabel("decoder layer", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02, label="kept fraction")
    fig.suptitle(f"allocation at removed ratio {ratio:g} (seed {seed})", fontsize=10)
    _save(fig, path)


def error_scatter(profiles: Sequence[LayerProfile], summary: CorrelationSummary, path: Path) -> None:
    """Weight-space vs output-space error of every profiled candidate, coloured by removed ratio."""
    ew = np.array([c.error_weight for p in profiles for c in p.candidates])
    eo = np.array([c.error_output for p in profiles for c in p.candidates])
    ratio = np.array([c.removed_ratio for p in profiles for c in p.candidates])
    fig = _figure(5.2, 4.4)
    ax = fig.subplots()
    points = ax.scatter(ew, eo, c=ratio, s=6, cmap="plasma", alpha=0.6, linewidths=0)
    if ew.size:
        hi = float(max(ew.max(), eo.max()))
        ax.plot([0, hi], [0, hi], color="gray", lw=0.8, ls="--", label="y = x")
        ax.legend(fontsize=8, loc="upper left")
    fig.colorbar(points, ax=ax, label="candidate removed ratio")
    ax.set_xlabel("weight-space error ||W - W_hat|| / ||W||")
    ax.set_ylabel("output-space error ||XW - XW_hat|| / ||XW||")
    median = summary.median
    ax.set_title(f"{ew.size} candidates, {len(profiles)} layers; per-layer Spearman median "
                 f"{median:.3f}" if median is not None else f"{ew.size} candidates", fontsize=9)
    _save(fig, path)


def spearman_histogram(correlations: Sequence[LayerCorrelation], path: Path) -> None:
    rhos = [r.spearman for r in correlations if r.spearman is not None]
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    ax.hist(rhos, bins=min(40, max(5, len(rhos) // 3)), color="tab:blue")
    ax.axvline(HIGH_CORRELATION, color="red", ls="--", lw=1, label=f"paper's {HIGH_CORRELATION}")
    ax.set_xlabel("per-layer Spearman(weight error, output error) over candidates")
    ax.set_ylabel("layers")
    ax.legend(fontsize=8)
    _save(fig, path)


def kept_per_layer(study: StudyResult, ratio: float, seed: int, path: Path) -> None:
    """Kept fraction of every targeted layer (model order) under each cost."""
    runs = study.runs_at(seed, ratio)
    names = study.layers
    fig = _figure(max(6.0, 0.05 * len(names) + 3), 3.6)
    ax = fig.subplots()
    markers = "os^Dvx*"
    for i, cost in enumerate(c for c in study.config.costs if c in runs):
        kept = _kept_by_name(runs[cost].allocation)
        ax.plot(range(len(names)), [kept[n] for n in names], marker=markers[i % len(markers)], ms=3, lw=0.8,
                alpha=0.8, label=cost)
    blocks = [layer_position(n)[0] for n in names]
    starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="lightgray", lw=0.5)
    ax.set_xlabel("targeted layer (model order; gray lines separate decoder layers)")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"per-layer kept fraction at removed ratio {ratio:g} (seed {seed})", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def _metric_panel(ax, study: StudyResult, metric: Callable[[MainRow], MeanStd | None], dense_value: float | None,
                  label: str, log_scale: bool) -> None:
    """One metric vs removed ratio, a line per cost, the dense model as a dotted line."""
    measured = [(r, m) for r in study.main_table.rows if (m := metric(r)) is not None]
    for cost in study.config.costs:
        mine = [(r.ratio, m) for r, m in measured if r.cost == cost]
        if mine:
            ax.errorbar([x for x, _ in mine], [m.mean for _, m in mine], yerr=[m.std or 0.0 for _, m in mine],
                        marker="o", ms=4, capsize=3, label=cost)
    if dense_value is not None:
        ax.axhline(dense_value, color="gray", ls=":", lw=1, label="dense")
    values = [m.mean for _, m in measured] + ([dense_value] if dense_value else [])
    if log_scale and values and max(values) > 3 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("removed ratio")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)


def metrics_vs_ratio(study: StudyResult, path: Path) -> None:
    """Average accuracy and perplexity vs removed ratio, mean +- std over seeds, per cost."""
    table = study.main_table
    dense = table.dense
    panels = [(lambda r: r.ppl, dense.ppl if dense else None, "WikiText-2 perplexity", True)]
    if table.has_accuracy:
        panels.append((lambda r: r.acc, dense.acc if dense else None, "average zero-shot accuracy", False))
    fig = _figure(4.6 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _metric_panel(ax, study, *panel)
    _save(fig, path)


def divergence_sweep(study: StudyResult, path: Path) -> None:
    """Allocation divergence between every pair of costs vs the target ratio (allocation-only sweep)."""
    points = [pt for seed_points in study.sweep.values() for pt in seed_points]
    pairs = list(dict.fromkeys(p for pt in points for p in pt.pairs))
    fig = _figure(9.0, 3.6)
    ax_share, ax_kept = fig.subplots(1, 2)
    for pair in pairs:
        ratios = sorted({pt.ratio for pt in points if pair in pt.pairs})
        at = [[pt.pairs[pair] for pt in points if pt.ratio == r and pair in pt.pairs] for r in ratios]
        label = pair_label(pair)
        ax_share.plot(ratios, [np.mean([d.share_differ for d in diffs]) for diffs in at], marker="o", ms=3,
                      label=label)
        ax_kept.plot(ratios, [np.mean([d.mean_abs_kept_diff for d in diffs]) for diffs in at], marker="o", ms=3,
                     label=label)
    ax_share.set_ylabel("share of layers allocated differently")
    ax_kept.set_ylabel("mean |kept fraction difference|")
    for ax in (ax_share, ax_kept):
        ax.set_xlabel("target removed ratio")
        if pairs:
            ax.legend(fontsize=8)
    fig.suptitle(f"allocation divergence (mean over {len(study.sweep)} seed(s))", fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------- all of them

def make_figures(study: StudyResult, profiles: Sequence[LayerProfile], out_dir: str | Path) -> dict[str, str]:
    """Draw every figure into ``out_dir``; returns name -> path relative to the study directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = study.first_seed
    first = study.divergence[seed]
    jobs: list[tuple[str, str, Callable[[Path], None]]] = []  # (name, file name, draw into a path)
    for ratio in study.config.ratios:
        tag = _ratio_tag(ratio)
        jobs += [(f"heatmap_{tag}", f"allocation_heatmap_r{tag}.png", partial(allocation_heatmaps, study, ratio, seed)),
                 (f"kept_per_layer_{tag}", f"kept_per_layer_r{tag}.png", partial(kept_per_layer, study, ratio, seed))]
    jobs += [("error_scatter", "error_scatter.png", partial(error_scatter, profiles, first.correlation_summary)),
             ("spearman_hist", "spearman_per_layer.png", partial(spearman_histogram, first.correlations)),
             ("metrics_vs_ratio", "metrics_vs_ratio.png", partial(metrics_vs_ratio, study)),
             ("divergence_sweep", "divergence_sweep.png", partial(divergence_sweep, study))]
    for _, file_name, draw in jobs:
        draw(out_dir / file_name)
    log.info("study: %d figures in %s", len(jobs), out_dir)
    return {name: f"{out_dir.name}/{file_name}" for name, file_name, _ in jobs}
