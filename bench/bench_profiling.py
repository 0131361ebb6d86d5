"""Profiling and allocation speed on SmolLM2-135M (prints figures; not a test).

Calibrates (or reuses cached Grams from --cache-dir), then profiles every targeted layer into a
fresh temporary profile store and times it (wall and CPU seconds, with the load average, since the
machine may be shared), then allocates with each of --costs at --ratios. With ``--ks-search auto`` the
search finds the best ks of one cost, so it profiles once per cost (``fisher`` would search ``output``'s).
``--compare`` profiles a second time with every candidate (``ks_search="exhaustive"``) and reports whether
the best ks per (layer, removed ratio) and the allocations agree.
``--workers 1,2`` profiles once per count of layers profiled at once (``RocketConfig.profile_workers``; 0 =
auto), in one process, and prints the ratio of their wall times and whether the allocations agree.
``--wiggle-reach none,2`` does the same for the ks search's scan of rows whose errors are not unimodal in ks
(``profiling.profile.KS_WIGGLE_REACH``: ``none`` scans the whole row, as before 2026-12-07), ``--rounds N`` repeats
the list interleaved and reports medians. ``--borrow no,yes`` does the same for a ks the search reaches without
products of its own (``profiling.profile.KS_BORROW_STATES``: ``no`` computes them dense, as before 2026-12-07;
``yes`` starts from a copy of the held products nearest in k). ``--compiled-steps no,yes`` does the same for the
thresholds and changed entries of a sparse step (``factorization.sparse_dictionary.COMPILED_STEPS``: ``no`` takes
torch's vectorised path, as before 2026-12-07; ``yes`` the compiled loop of ``factorization.step_kernel``).

    python bench/bench_profiling.py --calib-samples 64 --seq-len 512 \\
        --grid "removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0" --threads 2 --compare
    python bench/bench_profiling.py --threads 2 --ks-search exhaustive --workers 1,2
    python bench/bench_profiling.py --calib-samples 256 --seq-len 1024 --grid "removed=0.05:0.70:0.05;ks=1.0:3.0:0.1" \
        --threads 2 --costs output --wiggle-reach none,2 --rounds 2
    python bench/bench_profiling.py --calib-samples 256 --seq-len 1024 --grid "removed=0.05:0.70:0.05;ks=1.0:3.0:0.1" \
        --threads 2 --costs output --borrow no,yes --rounds 2 --compare
    python bench/bench_profiling.py --calib-samples 256 --seq-len 1024 --grid "removed=0.05:0.70:0.05;ks=1.0:3.0:0.1" \
        --threads 2 --costs output --compiled-steps no,yes --rounds 2
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import torch

from rocketlm import GridConfig, RocketConfig, load_model
from rocketlm.allocation.plan import allocate, layer_options
from rocketlm.calibration.run import calibration_windows, run_calibration
from rocketlm.calibration.store import GramStore
from rocketlm.factorization import sparse_dictionary
from rocketlm.models.discovery import decoder_structure
from rocketlm.pipeline import default_cache_dir, run_keys, targets_fingerprint
from rocketlm.profiling import profile as profile_module
from rocketlm.profiling.run import profile_workers, run_profiling
from rocketlm.profiling.store import ProfileStore


def profile_all(model, structure, grams, config, value_dtype, save: str | None):
    """Profiles of every layer into a temporary store; prints wall and CPU seconds per layer kind."""
    with tempfile.TemporaryDirectory() as tmp:
        store = ProfileStore(tmp, "bench", {})
        load, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        profiles = run_profiling(model, structure, grams, store, config, value_dtype, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        profile_all.wall = wall
        if save:
            with open(save, "w") as handle:
                handle.writelines(json.dumps(p.to_json()) + "\n" for p in profiles)
    per_kind = collections.defaultdict(list)
    for prof in profiles:
        per_kind[prof.name.rsplit(".", 1)[1]].append((prof.seconds, len(prof.candidates)))
    n_cand = sum(len(p.candidates) for p in profiles)
    workers = profile_workers(config.profile_workers, torch.device("cpu"))
    print(f"profiling (ks_search={config.ks_search}, {workers} layer(s) at once): {len(profiles)} layers, "
          f"{n_cand} candidates, wall {wall:.1f} s, "
          f"CPU {cpu:.1f} s, torch threads {torch.get_num_threads()}, load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    for kind, rows in per_kind.items():
        secs = sum(s for s, _ in rows)
        print(f"  {kind:<10} {secs:7.1f} layer-seconds, {sum(c for _, c in rows):6d} candidates")
    return profiles


def allocations(profiles, ratios, costs) -> dict:
    result = {}
    for ratio in ratios:
        for cost in costs:
            for alpha in ("auto", None):
                start = time.perf_counter()
                alloc = allocate(profiles, ratio, cost, alpha=alpha)
                result[(ratio, cost, alpha)] = [(c.name, c.removed_ratio, c.ks) for c in alloc.choices]
                print(json.dumps({"ratio": ratio, "cost": cost, "alpha": alpha, "alpha_used": alloc.alpha,
                                  "solve_s": round(time.perf_counter() - start, 4),
                                  "achieved": round(alloc.achieved_removed_ratio, 5), "total_cost": alloc.total_cost,
                                  "dense_layers": sum(c.dense for c in alloc.choices)}))
    return result


def profile_and_allocate(model, structure, grams, config, value_dtype, save, ratios, costs):
    """Profiles (once, or once per cost for a ks search) and the allocations of every cost; the wall time
    of the profiling, the best ks per (cost, layer, removed ratio) and the allocations."""
    per_cost = [(c,) for c in costs] if config.ks_search == "auto" else [tuple(costs)]
    wall, best, found = 0.0, {}, {}
    for group in per_cost:
        path = save.removesuffix(".jsonl") + f".{group[0]}.jsonl" if save and len(per_cost) > 1 else save
        profiles = profile_all(model, structure, grams, config.replace(cost=group[0]), value_dtype, path)
        wall += profile_all.wall
        for cost in group:
            best.update({(cost, p.name, c.removed_ratio): c.ks for p in profiles for c in layer_options(p, cost)})
        found.update(allocations(profiles, ratios, group))
    return wall, best, found


def reach_list(text: str) -> list[int | None]:
    """``--wiggle-reach``: comma list of positive integers or ``none``."""
    items = [r.strip() for r in text.split(",")]
    if not all(r == "none" or (r.isdigit() and int(r) >= 1) for r in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers or 'none', e.g. none,2")
    return [None if r == "none" else int(r) for r in items]


def yes_no_list(text: str) -> list[bool]:
    """``--borrow``: comma list of ``yes`` / ``no``."""
    items = [v.strip() for v in text.split(",")]
    if not all(v in ("yes", "no") for v in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give yes and/or no, e.g. no,yes")
    return [v == "yes" for v in items]


def variant_label(variant: tuple) -> str:
    workers, reach, borrow, compiled = variant
    return (f"--workers {workers}, wiggle reach {reach}, borrow {'yes' if borrow else 'no'}, "
            f"compiled steps {'yes' if compiled else 'no'}")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grid", default="removed=0.05:0.70:0.05;ks=1.0,1.5,2.0,2.5,3.0")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--costs", default="weight,output", help="costs allocated (and, for a ks search, searched)")
    p.add_argument("--ks-search", default="auto", choices=("auto", "exhaustive"))
    p.add_argument("--compare", action="store_true", help="also profile exhaustively and compare the allocations")
    p.add_argument("--save", default=None, help="write the profiles (JSON lines) here; with --compare, also "
                                                "SAVE.exhaustive.jsonl")
    p.add_argument("--data", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", default="0", help="comma list of layers profiled at once (0 = auto) [0]")
    p.add_argument("--wiggle-reach", type=reach_list, default=None,
                   help="comma list of the ks search's scan reach in lookaheads where a row is not unimodal "
                        "('none': the whole row) [the library's]")
    p.add_argument("--borrow", type=yes_no_list, default=None,
                   help="comma list: whether a ks new to the search starts from another ks's products (yes) or "
                        "dense ones (no) [the library's]")
    p.add_argument("--compiled-steps", type=yes_no_list, default=None,
                   help="comma list: whether a sparse step's thresholds and changed entries come from the compiled "
                        "loop (yes) or torch's vectorised path (no) [the library's]")
    p.add_argument("--rounds", type=positive_int, default=1, help="interleaved repetitions of the --workers x "
                                                                  "--wiggle-reach x --borrow x --compiled-steps list; "
                                                                  "medians reported [1]")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RocketConfig(removed_ratio=0.2, calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                          grid=GridConfig.parse(args.grid), ks_search=args.ks_search)
    model, tok = load_model("smollm2-135m")
    structure = decoder_structure(model)
    value_dtype = next(model.parameters()).dtype
    windows, _ = calibration_windows(tok, config, args.data)
    keys = run_keys(targets_fingerprint(model, structure), windows, structure, config, value_dtype)
    grams = GramStore(args.cache_dir or default_cache_dir(), keys.calibration, {})
    start = time.perf_counter()
    run_calibration(model, structure, windows, config, grams, progress=False)
    print(f"calibration (0 s if cached): {time.perf_counter() - start:.1f} s")
    ratios = [float(r) for r in args.ratios.split(",")]
    costs = args.costs.split(",")
    reaches = args.wiggle_reach or [profile_module.KS_WIGGLE_REACH]
    borrows = args.borrow or [profile_module.KS_BORROW_STATES]
    compiled = args.compiled_steps or [sparse_dictionary.COMPILED_STEPS]
    variants = [(int(w), r, b, c) for w in args.workers.split(",") for r in reaches for b in borrows for c in compiled]
    walls, found, best = {v: [] for v in variants}, None, None
    for _ in range(args.rounds):
        for variant in variants:
            workers, reach, borrow, sparse_dictionary.COMPILED_STEPS = variant
            profile_module.KS_WIGGLE_REACH, profile_module.KS_BORROW_STATES = reach, borrow
            run = config.replace(profile_workers=workers)
            wall, best_ks, got = profile_and_allocate(model, structure, grams, run, value_dtype, args.save,
                                                      ratios, costs)
            walls[variant].append(wall)
            label = variant_label(variant)
            if found is not None:
                differ = sum(a != b for key in got for a, b in zip(got[key], found[key]))
                moved = sum(best_ks.get(key) != ks for key, ks in best.items())
                print(f"{label}: " + ("identical allocations to the first" if not differ
                                      else f"{differ} layer choices differ")
                      + f"; best ks differs from the first's in {moved} of {len(best)}")
            found, best = found or got, best or best_ks
    walls = {v: statistics.median(w) for v, w in walls.items()}
    if len(walls) > 1:
        first = walls[variants[0]]
        for variant, wall in walls.items():
            print(f"{variant_label(variant)}: median {wall:.1f} s over {args.rounds} round(s), "
                  f"{first / wall:.2f}x the first's speed")
    if args.compare:
        full = config.replace(ks_search="exhaustive")
        save = args.save and args.save.removesuffix(".jsonl") + ".exhaustive.jsonl"
        wall, reference_best, reference = profile_and_allocate(model, structure, grams, full, value_dtype, save,
                                                               ratios, costs)
        print(f"profiling wall: {config.ks_search} {sum(walls.values()) / len(walls):.1f} s (mean over worker counts; "
              f"summed over the {len(costs)} costs searched), exhaustive {wall:.1f} s (once for every cost)")
        missed = [key for key, ks in reference_best.items() if best.get(key) != ks]
        print(f"best ks per (cost, layer, removed ratio): {len(reference_best) - len(missed)} of {len(reference_best)} "
              "as the exhaustive profile's" + (f"; differ: {missed[:10]}" if missed else ""))
        for key, choices in found.items():
            differ = sum(a != b for a, b in zip(choices, reference[key]))
            print(f"ratio {key[0]} cost {key[1]} alpha {key[2]}: "
                  + ("identical allocation" if not differ else f"{differ} layers allocated differently"))


if __name__ == "__main__":
    main()
