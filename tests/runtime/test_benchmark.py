"""The decode benchmark feeds the KV cache under the name the installed transformers uses."""
from __future__ import annotations

import warnings

import torch

from rocketlm.runtime.benchmark import cache_argument, time_decode
from tests.conftest import make_tiny_model


def test_decode_step_with_the_named_cache_equals_the_full_forward():
    model = make_tiny_model("llama").eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    name = cache_argument(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated cache argument would raise here
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], use_cache=True, **{name: out[name]}).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
        assert time_decode(model, prompt_tokens=4, new_tokens=3) > 0
