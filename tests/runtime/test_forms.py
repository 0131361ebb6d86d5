"""Every run-time form computes exactly ``x @ W_hat.T + b``; the choice never picks a slower form."""
from __future__ import annotations

import pytest
import torch

from rocketlm.compression.modules import pack_mask, unpack_mask
from rocketlm.config import GridConfig
from rocketlm.profiling.profile import valid_shapes
from rocketlm.runtime import convert_model, plan_forms
from rocketlm.runtime.forms import FORMS, build_form, form_bytes, form_flops
from rocketlm.runtime import forms as forms_module
from rocketlm.runtime import kernels
from rocketlm.runtime.benchmark import memory_figures
from rocketlm.runtime.forms import compact_form
from rocketlm.runtime.select import FormTiming, choose_form, random_layer


def _check_exact(d_in, d_out, k, s, bias, seed=0):
    source = random_layer(d_in, d_out, k, s, torch.float64, "cpu", seed=seed, bias=bias)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = x @ source.dense_weight().T + (source.bias if bias else 0)
    torch.testing.assert_close(source(x), expected, rtol=1e-12, atol=1e-12)
    for form in FORMS:
        module = build_form(source, form)
        torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12, msg=f"{form} {d_in}x{d_out} k{k} s{s}")
        assert module(x[0, 0]).shape == (d_out,)


@pytest.mark.parametrize("seed", range(6))
def test_forms_equal_dense_product_on_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = (int(v) for v in torch.randint(3, 70, (2,), generator=gen))
    k = int(torch.randint(1, min(d_in, d_out) + 1, (1,), generator=gen))
    s = int(torch.randint(1, k + 1, (1,), generator=gen))
    _check_exact(d_in, d_out, k, s, bias=bool(seed % 2), seed=seed)


def test_forms_equal_dense_product_on_every_candidate_shape_of_a_tiny_model(tiny_llama):
    grid = GridConfig(removed_ratios=tuple(round(0.05 * i, 2) for i in range(1, 15)), ks=(1.0, 1.5, 2.0, 2.5, 3.0))
    shapes = {(m.in_features, m.out_features) for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear)
              and m.out_features != tiny_llama.config.vocab_size}
    checked = 0
    for d_in, d_out in shapes:
        for _, _, k, s in valid_shapes(d_in, d_out, grid):
            _check_exact(d_in, d_out, k, s, bias=False)
            checked += 1
    assert checked > 50


def test_state_dict_of_every_factored_form_is_the_canonical_one():
    source = random_layer(40, 24, 12, 5, torch.float32, "cpu", bias=True)
    canonical = source.state_dict()
    for form in ("factored", "sparse", "packed"):
        state = build_form(source, form).state_dict()
        assert set(state) == set(canonical)
        for key in canonical:
            torch.testing.assert_close(state[key], canonical[key], rtol=0, atol=0)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (8, 8), (13, 29), (64, 3)])
def test_bitmap_round_trip(rows, cols):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * cols)) < 0.4
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (rows * cols + 7) // 8
    assert torch.equal(unpack_mask(bits, rows, cols), mask)


def test_bitmap_matches_numpy_packbits_layout():
    np = pytest.importorskip("numpy")
    mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(1)) < 0.5
    assert pack_mask(mask).numpy().tolist() == np.packbits(mask.numpy().reshape(-1)).tolist()


def test_choice_never_picks_a_form_slower_than_merged():
    merged = FormTiming("merged", 1.0, 1.0)
    assert choose_form([merged, FormTiming("factored", 0.5, 1.1)]) == "merged"  # slower at prefill
    assert choose_form([merged, FormTiming("factored", 1.2, 0.5)]) == "merged"  # slower at decode
    assert choose_form([merged, FormTiming("factored", 0.6, 0.7), FormTiming("sparse", 0.5, 0.9)]) == "factored"
    assert choose_form([merged, FormTiming("factored", 0.9, 0.9), FormTiming("sparse", 0.5, 0.6)]) == "sparse"
    assert choose_form([merged]) == "merged"
    # a tie with merged is not enough: a form must win by the margin at decode and at prefill
    assert choose_form([merged, FormTiming("factored", 0.95, 0.5)]) == "merged"
    assert choose_form([merged, FormTiming("factored", 0.95, 0.5)], margin=1.0) == "factored"


def test_flops_and_bytes_rules():
    assert form_flops("merged", 10, 20, 4, 2) == 200
    assert form_flops("factored", 10, 20, 4, 2) == 10 * 4 + 4 * 20
    assert form_flops("sparse", 10, 20, 4, 2) == 10 * 4 + 2 * 20
    assert form_bytes("factored", 10, 20, 4, 2, 4) == (10 * 4 + 4 * 20) * 4 + 10  # + the packed pattern
    assert form_bytes("merged", 10, 20, 4, 2, 2) == 400
    assert form_flops("packed", 10, 20, 4, 2) == form_flops("factored", 10, 20, 4, 2)  # what its prefill runs
    assert form_bytes("packed", 10, 20, 4, 2, 4) == (10 * 4 + 2 * 20) * 4 + 2 * 20  # one-byte atom indices
    assert form_bytes("packed", 10, 300, 260, 100, 4) == (10 * 260 + 100 * 300) * 4 + 100 * 300 * 2


@pytest.mark.parametrize("compiled", (True, False))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("d_in,d_out,k,s", [(30, 50, 20, 7), (20, 40, 300, 150), (8, 600, 700, 1)])
def test_packed_form_both_paths_at_decode_and_prefill(d_in, d_out, k, s, dtype, compiled, monkeypatch):
    """The gathered product (a few tokens) and the scatter + GEMM (more), compiled and torch's, equal the dense
    product; one-byte indices up to k = 256, two beyond."""
    if compiled and kernels._gather is None:
        pytest.skip("numba not installed")
    if not compiled:
        monkeypatch.setattr(kernels, "_gather", None)
    source = random_layer(d_in, d_out, k, s, dtype, "cpu", seed=k, bias=True)
    module = build_form(source, "packed")
    assert module.atoms.dtype == (torch.uint8 if k <= 256 else torch.int16)
    assert not hasattr(module, "V_mask")  # the pattern lives in the atom indices only
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for tokens in (1, forms_module.GATHER_MAX_TOKENS, forms_module.GATHER_MAX_TOKENS + 1, 37):
        x = torch.randn(1, tokens, d_in, dtype=dtype, generator=torch.Generator().manual_seed(tokens))
        expected = x @ source.dense_weight().T + source.bias
        torch.testing.assert_close(module(x), expected, **tol, msg=f"{tokens} tokens")
    assert kernels.available(x.reshape(-1, d_in)) == compiled


@pytest.mark.parametrize("tokens", (1, 37))
def test_packed_form_passes_gradients_like_the_canonical_layer(tokens):
    """Inference form, but not a silent dead end for autograd: through two packed layers in a row (which share the
    scratch V when no gradient is asked for), the input's and the values' gradients are the canonical layers'."""
    sources = [random_layer(24, 40, 12, 5, torch.float64, "cpu", seed=1, bias=True),
               random_layer(40, 24, 16, 6, torch.float64, "cpu", seed=2)]
    packed = [build_form(source, "packed") for source in sources]
    for module, source in zip(packed, sources):
        module.values.requires_grad_(True)
        source.V_values.requires_grad_(True)
    x = torch.randn(tokens, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.randn(tokens, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (packed[1](packed[0](x)) * weights).sum().backward()
    gx, x.grad = x.grad.clone(), None
    (sources[1](sources[0](x)) * weights).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-12)
    for module, source in zip(packed, sources):
        torch.testing.assert_close(module.values.grad, source.V_values.grad.T, rtol=1e-12, atol=1e-12)


def test_packed_form_holds_fewer_bytes_than_factored_where_its_indices_cost_less_than_the_zeros():
    # one-byte indices (k <= 256) pay off beyond ks = 1.25, two-byte ones beyond 1.5
    for k, s, fewer in ((60, 20, True), (60, 40, True), (60, 50, False), (300, 150, True), (300, 250, False)):
        source = random_layer(64, 96, k, s, torch.float32, "cpu")
        held = {form: memory_figures(build_form(source, form)).resident_weight_bytes for form in ("factored", "packed")}
        assert held["packed"] == form_bytes("packed", 64, 96, k, s, 4)
        assert held["factored"] == form_bytes("factored", 64, 96, k, s, 4)
        assert (held["packed"] < held["factored"]) == fewer, (k, s, held)


def test_compact_form_takes_the_fewest_resident_bytes():
    for d_in, d_out, k, s in ((200, 300, 60, 20), (200, 300, 60, 50), (600, 900, 300, 150), (600, 900, 300, 250),
                              (64, 96, 64, 64), (576, 1536, 329, 164)):
        chosen = compact_form(d_in, d_out, k, s, 4)
        sizes = {form: form_bytes(form, d_in, d_out, k, s, 4) for form in ("factored", "packed", "merged")}
        assert sizes[chosen] == min(sizes.values()), (d_in, d_out, k, s, chosen, sizes)
    assert compact_form(200, 300, 60, 20, 4) == "packed" and compact_form(600, 900, 300, 250, 4) == "factored"
    assert compact_form(64, 96, 64, 64, 4) == "merged"  # a full-rank dictionary holds more than the dense layer


def test_convert_model_auto_measures_and_keeps_logits(tmp_path):
    from tests.conftest import make_tiny_model
    model = make_tiny_model("llama")
    layer = random_layer(64, 128, 16, 8, torch.float32, "cpu", seed=3)
    from rocketlm.compression.modules import replace_module
    replace_module(model, "model.layers.0.mlp.up_proj", layer)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    forms = plan_forms(model, "auto", cache_dir=tmp_path)
    assert set(forms) == {"model.layers.0.mlp.up_proj"} and forms["model.layers.0.mlp.up_proj"] in FORMS
    assert (tmp_path / "runtime").is_dir()  # the measured table is cached per device
    convert_model(model, "auto", cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_convert_model_compact_packs_by_bytes_and_keeps_logits(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_model
    from rocketlm.compression.modules import replace_module
    from rocketlm.runtime import select
    model = make_tiny_model("llama")
    replace_module(model, "model.layers.0.mlp.up_proj", random_layer(64, 128, 16, 6, torch.float32, "cpu", seed=3))
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    monkeypatch.setattr(select, "measure_shape", lambda *shape: pytest.fail("compact times nothing"))
    assert convert_model(model, "compact", cache_dir=tmp_path) == {"model.layers.0.mlp.up_proj": "packed"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
