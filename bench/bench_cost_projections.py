"""``rocketlm estimate`` for a set of model shapes at the default run (prints a markdown table; not a test).

The configs are written from their published hyperparameters into a temporary directory (no
download, no weights): Llama-3.2-1B, Llama-3-8B, Qwen3-8B, Llama-3-70B; SmolLM2-135M is the preset.
Every model is projected on this machine (float32, as a CPU run should load it: this AVX2 CPU runs
bfloat16 GEMMs hundreds of times slower) and, by :func:`project_to_device`, on an H100 SXM.

    OMP_NUM_THREADS=1 python bench/bench_cost_projections.py --out docs/cost/projections.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

CONFIGS = {
    "Llama-3.2-1B": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   tie_word_embeddings=True, rope_theta=500000.0, dtype="bfloat16")),
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                 rope_theta=500000.0, dtype="bfloat16")),
    "Qwen3-8B": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                               rope_theta=1000000.0, dtype="bfloat16")),
    "Llama-3-70B": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                                  rope_theta=500000.0, dtype="bfloat16")),
}


def write_config(name: str, root: Path) -> str:
    from transformers import LlamaConfig, Qwen3Config
    kind, values = CONFIGS[name]
    path = root / name
    (LlamaConfig if kind == "llama" else Qwen3Config)(**values).save_pretrained(path)
    return str(path / "config.json")


def table(rows: list[tuple]) -> str:
    """Stage x model markdown: time on this machine / on the target, and peak memory."""
    from rocketlm.estimation.report import format_bytes, format_seconds
    names = [name for name, _, _ in rows]
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage in [s.name for s in rows[0][1].stages] + ["total"]:
        cells = []
        for _, cpu, gpu in rows:
            here = cpu.total_seconds if stage == "total" else cpu.stage(stage).seconds
            there = gpu.total_seconds if stage == "total" else gpu.stage(stage).seconds
            peak = cpu.peak_bytes if stage == "total" else cpu.stage(stage).peak_bytes
            cells.append(f"{format_seconds(here)} / {format_seconds(there)} ({format_bytes(peak)})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from rocketlm.config import RocketConfig
    from rocketlm.estimation import H100, EstimateOptions, estimate, project_to_device
    from rocketlm.estimation.report import format_estimate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="SmolLM2-135M," + ",".join(CONFIGS))
    p.add_argument("--dtype", default="float32", help="load dtype of every model on this CPU [float32]")
    p.add_argument("--max-probe-dim", type=int, default=4096)
    p.add_argument("--max-probe-tokens", type=int, default=1024)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                   help="cpu: CPU seconds (with OMP_NUM_THREADS=1, one idle core, whatever the load) [cpu]")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows, results = [], {}
    if args.out and Path(args.out).is_file():  # keep the models measured by an earlier run
        results = json.loads(Path(args.out).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = "smollm2-135m" if name == "SmolLM2-135M" else write_config(name, Path(tmp))
            options = EstimateOptions(dtype=args.dtype, max_probe_dim=args.max_probe_dim,
                                      max_probe_tokens=args.max_probe_tokens, clock=args.clock, repeats=args.repeats)
            result = estimate(model, RocketConfig(), options)
            gpu = project_to_device(result, H100)
            print(f"== {name} (load {os.getloadavg()[0]:.1f})\n{format_estimate(result, gpu, shapes=True)}\n",
                  flush=True)
            rows.append((name, result, gpu))
            results[name] = {"cpu": result.to_json(), "h100": gpu.to_json()}
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print("time on this CPU / on an H100 SXM (GEMM-rate scaled lower bound) (peak memory)")
    print(table(rows))


if __name__ == "__main__":
    main()
