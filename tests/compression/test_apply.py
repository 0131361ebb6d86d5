"""The compression stage without refits (``apply_allocation``)."""
import gc
import weakref

import torch

from conftest import make_tiny_model, make_tiny_tokenizer, tiny_rocket_config
from rocketlm.compression import apply
from rocketlm.compression.modules import SparseDictionaryLinear
from rocketlm.pipeline import compress


def test_each_replaced_dense_layer_is_freed_before_the_next_is_compressed(calib_file, tmp_path, monkeypatch):
    """The stage's peak holds one dense layer being replaced, not the whole dense model beside the compressed one."""
    replaced: list[tuple[str, weakref.ref]] = []
    replace_module = apply.replace_module

    def watched(model, name, module):
        gc.collect()
        assert all(ref() is None for _, ref in replaced), [n for n, ref in replaced if ref() is not None]
        old = replace_module(model, name, module)
        replaced.append((name, weakref.ref(old)))
        return old

    monkeypatch.setattr(apply, "replace_module", watched)
    model = make_tiny_model("llama")
    result = compress(model, make_tiny_tokenizer(), tiny_rocket_config(calib_file, refine_iters=1),
                      cache_dir=tmp_path / "cache", progress=False)
    assert len(replaced) == sum(not c.dense for c in result.allocation.choices) > 1
    assert all(isinstance(model.get_submodule(name), SparseDictionaryLinear) for name, _ in replaced)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()
