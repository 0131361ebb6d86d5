"""A :class:`CostEstimate` as a readable table (the CLI prints it)."""
from __future__ import annotations

from rocketlm.estimation.estimate import CostEstimate


def format_seconds(seconds: float) -> str:
    """``0.05 s``, ``42 s``, ``6 min 41 s``, ``3 h 12 min``, ``2.1 days``."""
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 86400:.1f} days"


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2 ** 10:.0f} KiB"


def _header(result: CostEstimate) -> list[str]:
    m, c = result.model_summary, result.config
    grid = c["grid"]
    load = "/".join(f"{x:g}" for x in result.load_average) or "?"
    return [f"rocketlm estimate {result.model}: {m['model_type']}, {m['parameters'] / 1e6:,.1f}M parameters "
            f"({m['dtype']}), {m['blocks']} blocks, {m['target_layers']} target layers in {len(m['shapes'])} shapes, "
            f"{m['gram_groups']} Gram groups",
            f"run: {c['calib_samples']} x {c['calib_seq_len']} calibration tokens (batch {c['calib_batch_size']}), "
            f"grid {len(grid['removed_ratios'])} removed ratios x {len(grid['ks'])} ks, "
            f"removed {c['removed_ratio']:g}, "
            f"{result.nproc} process{'es' if result.nproc > 1 else ''}",
            f"timed on: {result.device} (load average {load}); estimate took {format_seconds(result.estimate_seconds)}"]


def stage_table(result: CostEstimate, extra: CostEstimate | None = None) -> list[str]:
    """Stage rows: time, peak memory, the largest parts; ``extra``: the same run on another device."""
    head = f"{'stage':<12} {'time':>14} {'peak memory':>12}"
    head += f" {'on ' + extra.device:>18}" if extra else ""
    lines = [head + "   main parts", "-" * (len(head) + 40)]
    for stage in result.stages:
        parts = sorted(stage.components, key=lambda c: -c.seconds)[:3]
        row = f"{stage.name:<12} {format_seconds(stage.seconds):>14} {format_bytes(stage.peak_bytes):>12}"
        row += f" {format_seconds(extra.stage(stage.name).seconds):>18}" if extra else ""
        lines.append(row + "   " + ", ".join(f"{c.name} {format_seconds(c.seconds)}" for c in parts))
    total = f"{'total':<12} {format_seconds(result.total_seconds):>14} {format_bytes(result.peak_bytes):>12}"
    lines.append(total + (f" {format_seconds(extra.total_seconds):>18}" if extra else "") + "   (peak: largest stage)")
    return lines


def shape_table(result: CostEstimate) -> list[str]:
    lines = [f"{'layer shape':>13} {'timed at':>11} {'profile':>10} {'cands':>5} {'basis':>10} {'compress':>10} "
             f"{'whitening':>10}   (per layer, scaled to its shape)"]
    for p in result.layer_probes:
        lines.append(f"{p['d_in']:>6}x{p['d_out']:<6} {p['probe_d_in']:>5}x{p['probe_d_out']:<5} "
                     f"{format_seconds(p['profile_s']):>10} {p['candidates']:>5} {format_seconds(p['basis_s']):>10} "
                     f"{format_seconds(p['compress_s']):>10} {format_seconds(p['whitening_s'] or 0.0):>10}")
    return lines


def format_estimate(result: CostEstimate, extra: CostEstimate | None = None, shapes: bool = False) -> str:
    lines = _header(result) + [""] + stage_table(result, extra)
    lines.append(f"Gram cache on disk: {format_bytes(result.gram_cache_bytes)}")
    if shapes:
        lines += [""] + shape_table(result)
    notes = result.notes + [n for s in result.stages for n in s.notes] + (extra.notes[-1:] if extra else [])
    lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)
