"""Peak memory of a disk-offloaded compression against the model's in-memory size.

    # 1. a randomly initialised model with Llama-3.2-1B's shape, saved under /tmp (never in the repo)
    python bench/bench_offload.py make /tmp/llama1b-random
    # 2. compress it with --offload disk under /usr/bin/time -v, report peak RSS against the model size
    python bench/bench_offload.py run /tmp/llama1b-random --out /tmp/llama1b-rocket

Measured 2026-12-04 (one thread, shared machine, 8 x 256 tokens, grid removed=0.3,0.5;ks=1,2, fisher cost,
3 refits; peak RSS from /proc VmHWM per stage, over three runs resumed from the cache): 16 layers, 4.94 GB
in memory: calibration 2.38 GB, profiling 2.53 GB, sensitivities 2.78 GB, compression of the first 3 blocks
2.79 GB. 2026-12-05, end to end (resumed with calibration, profiles and sensitivities cached; this script's
/usr/bin/time figure): peak RSS 4.04 GB = 0.82x the model over the whole compression stage (16 blocks,
4815 s on one thread of a shared machine), the spikes inside the 8192-wide layers' factorizations.

Random weights are fine: this measures memory and time, not quality. The tokenizer is a small
word-level one trained on the fly (ids < 500, a subset of the 128256-token vocabulary).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                tie_word_embeddings=True, rope_theta=500000.0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(f"w{i}" for i in range(480))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make(path: str, layers: int, dtype: str) -> None:
    """Build the model layer by layer on the meta device and write it in one safetensors file,
    one tensor at a time (this script itself never holds the model either)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rocketlm.offload.safetensors_stream import StreamingSafetensorsWriter

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, dtype=dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    std = config.initializer_range
    specs = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        specs[name] = (tuple(t.shape), getattr(torch, dtype))
    with StreamingSafetensorsWriter(out / "model.safetensors", specs, {"format": "pt"}) as writer:
        for name, (shape, dt) in specs.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape) * std
            writer.write(name, t.to(dt))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    calib = out / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 480}" for i in range(40000)))
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e9:.2f} GB)")


def run(path: str, out: str, samples: int, seq_len: int, grid: str, offload: str) -> dict:
    from safetensors import safe_open
    size = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            size += n * {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()]
    cmd = [sys.executable, "-m", "rocketlm", "compress", path, "--ratio", "0.3", "--out", out, "--overwrite",
           "--calib", str(Path(path) / "calib.txt"), "--calib-samples", str(samples), "--seq-len", str(seq_len),
           "--calib-batch-size", "4", "--grid", grid, "--offload", offload, "-q",
           "--cache-dir", str(Path(out).parent / (Path(out).name + ".cache"))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:])
        raise SystemExit(proc.returncode)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = {"model_bytes_in_memory": size, "peak_rss_bytes": peak_kb * 1024,
              "peak_rss_over_model": peak_kb * 1024 / size, "wall_s": round(wall, 1),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "offload": offload,
              "samples": samples, "seq_len": seq_len, "grid": grid, "command": " ".join(cmd)}
    print(proc.stdout[-1500:])
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("path")
    m.add_argument("--layers", type=int, default=16)
    m.add_argument("--dtype", default="float32")
    r = sub.add_parser("run")
    r.add_argument("path")
    r.add_argument("--out", required=True)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--grid", default="removed=0.3,0.5;ks=1,2")
    r.add_argument("--offload", default="disk")
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.path, args.layers, args.dtype)
    else:
        run(args.path, args.out, args.samples, args.seq_len, args.grid, args.offload)


if __name__ == "__main__":
    main()
