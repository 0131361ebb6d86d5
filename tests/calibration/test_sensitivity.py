"""Block-by-block sensitivities (the ``fisher`` cost's) against one full backward pass through the model."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHS, make_tiny_model
from rocketlm.calibration.sensitivity import measure_sensitivities
from rocketlm.models.discovery import decoder_structure


def full_backward(model, structure, windows):
    """Every target layer's mean ||g_t||^2 and ||y_t||^2 from autograd over the whole model, one window at a time."""
    modules = dict(model.named_modules())
    grad_sq = {name: 0.0 for name in structure.all_targets}
    out_sq = dict(grad_sq)
    for ids in windows.split(1):
        outs = {}
        handles = [modules[name].register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o))
                   for name in structure.all_targets]
        logits = model(input_ids=ids, use_cache=False).logits
        for handle in handles:
            handle.remove()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(nll, [outs[name] for name in structure.all_targets])
        for name, g in zip(structure.all_targets, grads):
            grad_sq[name] += float(g.double().square().sum())
            out_sq[name] += float(outs[name].detach().double().square().sum())
    tokens = windows.numel()
    return {name: (grad_sq[name] / tokens, out_sq[name] / tokens) for name in structure.all_targets}


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_sensitivities_equal_a_full_backward(arch, tmp_path):
    model = make_tiny_model(arch)
    structure = decoder_structure(model)
    windows = torch.randint(0, 500, (3, 20), generator=torch.Generator().manual_seed(1))
    expected = full_backward(model, structure, windows)
    held = []

    @contextlib.contextmanager
    def hold(b):
        held.append(b)
        yield

    # in memory / spilled; the head on whole windows / on 7 positions of one window at a time (3 uneven chunks)
    for spill, chunk, batch in ((None, None, 1), (tmp_path, None, 1), (None, 7, 2)):
        held.clear()
        got = measure_sensitivities(model, structure, windows, batch_size=batch, progress=False, hold=hold,
                                    spill_dir=spill, head_chunk_tokens=chunk)
        for name, (grad_sq, out_sq) in expected.items():
            assert got[name].grad_sq == pytest.approx(grad_sq, rel=1e-5), name
            assert got[name].out_sq == pytest.approx(out_sq, rel=1e-6), name
        n = len(structure.blocks)
        assert held == list(range(n)) + list(reversed(range(n)))  # forward walk, then backward walk
    assert not list(tmp_path.iterdir())  # spilled inputs are removed once read back


def test_sums_over_shares_add_up_to_the_whole():
    """The data-parallel split: sums over disjoint window shares (one empty) add up to the sums over all."""
    from rocketlm.calibration.sensitivity import measure_sensitivity_sums
    from rocketlm.distributed.sensitivity import window_share
    model = make_tiny_model("llama")
    structure = decoder_structure(model)
    windows = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(2))
    whole = measure_sensitivity_sums(model, structure, windows, progress=False)
    shares = [window_share(3, r, 4) for r in range(4)]
    assert [b - a for a, b in shares] == [0, 1, 1, 1]
    parts = [measure_sensitivity_sums(model, structure, windows[a:b], progress=False) for a, b in shares]
    assert parts[0].tokens == 0 and all(v == 0.0 for v in parts[0].grad_sq.values())
    assert sum(p.tokens for p in parts) == whole.tokens == windows.numel()
    for name in structure.all_targets:
        assert parts[0].d_out[name] == whole.d_out[name] == dict(model.named_modules())[name].weight.shape[0]
        assert sum(p.grad_sq[name] for p in parts) == pytest.approx(whole.grad_sq[name], rel=1e-12)
        assert sum(p.out_sq[name] for p in parts) == pytest.approx(whole.out_sq[name], rel=1e-12)


@pytest.mark.parametrize("spill", [False, True])
def test_block_inputs_come_back_exactly_as_put(spill, tmp_path):
    """The held block inputs (one buffer per block in memory, a file per block when spilled) round-trip exactly,
    batches of unequal size included (the last batch of a split)."""
    from rocketlm.calibration.sensitivity import _Inputs
    inputs = _Inputs(tmp_path if spill else None)
    generator = torch.Generator().manual_seed(0)
    hidden = {b: [torch.randn(n, 5, 3, generator=generator) for n in (2, 2, 1)] for b in range(3)}
    for b in range(3):
        inputs.put(b, hidden[b])
    for b in reversed(range(3)):
        back = inputs.take(b, torch.device("cpu"))
        assert len(back) == 3 and all(torch.equal(x, y) for x, y in zip(back, hidden[b]))
