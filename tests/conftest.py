"""Shared fixtures: tiny randomly initialised causal LMs built from configs, and an
offline tokenizer trained on the fly (no hub access needed)."""
from __future__ import annotations

import pytest
import torch

TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def make_tiny_config(arch: str):
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config)
    if arch == "llama":
        return LlamaConfig(**TINY_COMMON)
    if arch == "qwen2":
        return Qwen2Config(**TINY_COMMON)
    if arch == "qwen3":
        return Qwen3Config(**TINY_COMMON, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**TINY_COMMON, sliding_window=None)
    if arch == "gemma3":
        return Gemma3TextConfig(**TINY_COMMON, head_dim=16, sliding_window=32,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


def make_tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_tiny_config(arch))
    return model.eval()


_TOKENIZER = None


def make_tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary (fast, offline, deterministic)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"])
        words = [f"w{i}" for i in range(400)] + list("abcdefghijklmnopqrstuvwxyz.,?!:;'\"()0123456789")
        text = [" ".join(words)] + ["the quick brown fox jumps over the lazy dog"]
        tok.train_from_iterator(text, trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                             eos_token="</s>", pad_token="</s>")
    return _TOKENIZER


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny_arch(request):
    return request.param


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def data_dir(tmp_path):
    """A tiny data directory laid out like ../shared/data (calibration text, WikiText-2 test)."""
    root = tmp_path / "data"
    (root / "calib").mkdir(parents=True)
    (root / "calib" / "a.txt").write_text(" ".join(f"w{(i * 13) % 400}" for i in range(5000)))
    (root / "wikitext-2-raw").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(" ".join(f"w{(i * j) % 400}" for j in range(30))
                                                                     for i in range(40)))
    return root


TINY_GRID_RATIOS, TINY_GRID_KS = (0.1, 0.3, 0.5, 0.7), (1.0, 2.0, 3.0)


@pytest.fixture
def calib_file(tmp_path):
    """A calibration text over the tiny tokenizer's vocabulary."""
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{(i * 7) % 400}" for i in range(6000)))
    return str(path)


def tiny_rocket_config(calib_file: str, **changes):
    """A small, fast RocketConfig for tiny models (8 x 32 calibration tokens, a 4 x 3 grid)."""
    from rocketlm.config import GridConfig, RocketConfig
    base = dict(model="tiny", removed_ratio=0.3, cost="output", calib_files=(calib_file,), calib_samples=8,
                calib_seq_len=32, grid=GridConfig(removed_ratios=TINY_GRID_RATIOS, ks=TINY_GRID_KS))
    base.update(changes)
    return RocketConfig(**base)


def tiny_ids():
    return make_tiny_tokenizer()(" ".join(f"w{i}" for i in range(40)), return_tensors="pt").input_ids
