import pytest
import torch

from conftest import make_tiny_model
from rocketlm.calibration.grams import (CalibrationError, block_kwargs, copy_held, first_block_inputs,
                                       iterate_block_grams)
from rocketlm.models.discovery import decoder_structure


def _windows(n=6, seq=24, seed=0, vocab=512):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _reference_grams(model, structure, windows):
    """Hook every target linear of the whole model during ordinary full forwards (no block-wise tricks)."""
    grams, handles = {}, []
    modules = dict(model.named_modules())
    for name in structure.all_targets:
        def hook(module, args, name=name):
            X = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + X.T @ X
        handles.append(modules[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, windows.shape[0], 2):
            model(input_ids=windows[i:i + 2], use_cache=False)
    for h in handles:
        h.remove()
    return grams


def test_blockwise_grams_equal_full_model_grams(tiny_arch):
    model = make_tiny_model(tiny_arch)
    structure = decoder_structure(model)
    windows = _windows()
    expected = _reference_grams(model, structure, windows)
    seen = set()
    for b, grams in iterate_block_grams(model, structure, windows, batch_size=2):
        for name in structure.targets[b]:
            # float32 GEMMs per batch: entrywise to float32 rounding of the largest entries
            scale = float(expected[name].abs().max())
            assert torch.allclose(grams.gram(name), expected[name], rtol=1e-5, atol=1e-6 * scale), name
            seen.add(name)
        assert grams.tokens == windows.numel()
        # q/k/v read one tensor and share one Gram; gate/up too
        prefix = structure.blocks[b][0]
        assert grams.group_of[f"{prefix}.self_attn.k_proj"] == grams.group_of[f"{prefix}.self_attn.q_proj"]
        assert grams.group_of[f"{prefix}.mlp.up_proj"] == grams.group_of[f"{prefix}.mlp.gate_proj"]
        assert grams.group_of[f"{prefix}.mlp.down_proj"] != grams.group_of[f"{prefix}.mlp.gate_proj"]
        assert len(grams.grams) == 4
    assert seen == set(structure.all_targets)


@pytest.mark.parametrize("sizes", [(2, 2, 1), (3,)])
def test_first_block_inputs_are_views_of_one_buffer_equal_to_each_batchs_states(sizes):
    model = make_tiny_model("llama")
    structure = decoder_structure(model)
    windows = _windows(n=sum(sizes))
    batches = list(windows.split(list(sizes)))
    hidden = first_block_inputs(model, structure, batches)
    base = hidden[0].untyped_storage().data_ptr()
    assert all(h.untyped_storage().data_ptr() == base for h in hidden)
    for h, ids in zip(hidden, batches):
        assert torch.equal(h, model.model.embed_tokens(ids))
    copied = copy_held(hidden)
    assert all(torch.equal(c, h) for c, h in zip(copied, hidden))
    assert copied[0].untyped_storage().data_ptr() != base
    assert len({c.untyped_storage().data_ptr() for c in copied}) == 1
    # batches of different lengths: one tensor each, copies unaliased
    ragged = first_block_inputs(model, structure, [windows[:2], windows[2:3, :10]])
    assert [tuple(h.shape[:2]) for h in ragged] == [(2, 24), (1, 10)]
    assert all(c.data_ptr() != h.data_ptr() and torch.equal(c, h) for c, h in zip(copy_held(ragged), ragged))


def test_block_inputs_and_grams_never_run_the_head(tiny_arch):
    """The keyword capture stops as the last block is entered: no tokens x vocabulary logits, and an offloaded
    model's head is never read during calibration."""
    model = make_tiny_model(tiny_arch)
    structure = decoder_structure(model)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        kwargs = block_kwargs(model, structure, _windows(n=2))
        for _ in iterate_block_grams(model, structure, _windows(), batch_size=2):
            pass
    finally:
        handle.remove()
    assert calls == []
    assert len(kwargs) == len(structure.blocks) and all(kwargs)  # every block's keywords captured


def test_nan_activation_raises_with_the_layer_name():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    structure = decoder_structure(model)
    with pytest.raises(CalibrationError, match=r"layers\.0\.mlp\.gate_proj"):
        for _ in iterate_block_grams(model, structure, _windows(), batch_size=3):
            pass


@pytest.mark.parametrize("d,block", [(5, 384), (50, 16), (97, 24), (64, 64)])
def test_blocked_gram_update_equals_full_product_and_is_symmetric(d, block):
    from rocketlm.calibration.grams import add_gram_
    gen = torch.Generator().manual_seed(d)
    X = torch.randn(300, d, generator=gen, dtype=torch.float64)
    G = torch.eye(d, dtype=torch.float64)
    add_gram_(G, X, block=block)
    add_gram_(G, 2 * X, block=block)
    assert torch.allclose(G, torch.eye(d, dtype=torch.float64) + 5 * X.T @ X, rtol=1e-12, atol=1e-10)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("d,block", [(50, 16), (97, 24)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])  # 1e30: its square overflows
def test_gram_update_refuses_non_finite_activations_and_leaves_the_gram_unchanged(d, block, bad):
    from rocketlm.calibration.grams import add_gram_
    gen = torch.Generator().manual_seed(d)
    X = torch.randn(40, d, generator=gen)
    G = torch.eye(d, dtype=torch.float64)
    assert add_gram_(G, X, block=block)
    before = G.clone()
    for column in (0, d // 2, d - 1):  # in the first, a middle and the last column block
        Y = X.clone()
        Y[7, column] = bad
        assert not add_gram_(G, Y, block=block)
        assert torch.equal(G, before)


def test_float32_batch_grams_accumulated_in_float64_stay_accurate():
    from rocketlm.calibration.grams import add_gram_, gram_work_dtype
    gen = torch.Generator().manual_seed(7)
    d = 96
    scales = torch.ones(d)
    scales[:3] = torch.tensor([80.0, 30.0, 10.0])  # outlier channels, as in LLM activations
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) / d ** 0.5
    exact = torch.zeros(d, d, dtype=torch.float64)
    fast = torch.zeros(d, d, dtype=torch.float64)
    for _ in range(24):  # batches of 2048 tokens (4 windows x 512)
        X = (torch.randn(2048, d, generator=gen) * scales) @ mix + 0.5
        add_gram_(exact, X.double())
        add_gram_(fast, X.to(gram_work_dtype(X.dtype)))
    assert fast.dtype == torch.float64 and torch.equal(fast, fast.T)
    assert float((fast - exact).norm() / exact.norm()) < 1e-6
    diag = exact.diagonal().sqrt()
    assert float(((fast - exact).abs() / (diag[:, None] * diag[None, :])).max()) < 1e-5  # entrywise, in correlation units
    # the whitening (what profiling uses) moves by float32-level amounts, its spectrum included
    ev_exact, ev_fast = torch.linalg.eigvalsh(exact), torch.linalg.eigvalsh(fast)
    assert float(((ev_fast - ev_exact).abs() / ev_exact).max()) < 1e-4
    assert gram_work_dtype(torch.float64) == torch.float64 and gram_work_dtype(torch.bfloat16) == torch.float32
