"""Sequential calibration, upstream correction, alternating refinement and the fisher cost on tiny models."""
import copy

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer, tiny_ids, tiny_rocket_config
from rocketlm.allocation.plan import allocate
from rocketlm.calibration.grams import add_gram_, gram_work_dtype, iterate_block_grams
from rocketlm.calibration.sensitivity import attach_sensitivities, measure_sensitivities
from rocketlm.calibration.sequential import iterate_sequential_grams
from rocketlm.checkpoint.io import load_compressed, save_compressed
from rocketlm.compression.modules import SparseDictionaryLinear, replace_module
from rocketlm.compression.sequential import decide_sequential, refit_factors
from rocketlm.config import SEQUENTIAL_AUTO_DAMPING, SEQUENTIAL_AUTO_FROM_REMOVED, ConfigError, RocketConfig
from rocketlm.factorization.sparse_dictionary import candidate_shape, whitening_factor
from rocketlm.factorization.whitening import weight_matrix
from rocketlm.models.discovery import decoder_structure
from rocketlm.pipeline import compress
from rocketlm.preflight import check_processes



def _windows(n=6, seq=24, seed=0, vocab=512):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _input_grams(model, names, windows, other=None):
    """Grams of every layer's input over ordinary full forwards; with ``other`` (a model of the same
    architecture) also the cross-Grams ``X_model^T X_other`` of the same tokens. The arithmetic is the
    calibration's: one product per batch in :func:`gram_work_dtype`, summed into float64."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for tag, m in enumerate((model, other) if other is not None else (model,)):
        modules = dict(m.named_modules())
        for name in names:
            def hook(module, args, name=name, tag=tag):
                X = args[0].reshape(-1, args[0].shape[-1])
                captured[(tag, name)] = X.to(gram_work_dtype(X.dtype))
            handles.append(modules[name].register_forward_pre_hook(hook))
    grams, cross = {}, {}
    with torch.no_grad():
        for i in range(0, windows.shape[0], 2):
            model(input_ids=windows[i:i + 2], use_cache=False)
            if other is not None:
                other(input_ids=windows[i:i + 2], use_cache=False)
            for name in names:
                X = captured[(0, name)]
                if name not in grams:
                    grams[name] = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
                add_gram_(grams[name], X)
                if other is not None:
                    cross[name] = cross.get(name, 0) + (X.T @ captured[(1, name)]).double()
    for h in handles:
        h.remove()
    return grams, cross


def _compress_stage(model, stage, removed=0.5, ks=2.0, cross=True):
    """Compress a stage's layers with their closed-form factors (the consumer of the iterator)."""
    config = RocketConfig(removed_ratio=0.5)
    modules = dict(model.named_modules())
    S = whitening_factor(stage.gram)
    for name in stage.layers:
        W = weight_matrix(modules[name])
        k, s = candidate_shape(*W.shape, removed, ks)
        f = refit_factors(W, S, stage.cross if cross else None, k, s, config)
        replace_module(model, name, SparseDictionaryLinear.from_factors(f.U, f.V, f.mask, s, None, torch.float32))


def test_sequential_without_compression_equals_dense_calibration(tiny_arch):
    model = make_tiny_model(tiny_arch)
    structure = decoder_structure(model)
    windows = _windows()
    dense = {b: g for b, g in iterate_block_grams(model, structure, windows, batch_size=2)}
    stages = list(iterate_sequential_grams(model, structure, windows, 2, structure.all_targets, cross=True))
    # per block: q/k/v, o, gate/up, down, in execution order
    assert [len(s.layers) for s in stages[:4]] == [3, 1, 2, 1]
    assert sorted(n for s in stages for n in s.layers) == sorted(structure.all_targets)
    for stage in stages:
        for name in stage.layers:
            expected = dense[stage.block].gram(name)
            assert torch.allclose(stage.gram, expected, rtol=1e-10, atol=1e-10), name
            assert torch.allclose(stage.cross, expected, rtol=1e-10, atol=1e-10), name
        assert stage.tokens == windows.numel()


@pytest.mark.parametrize("arch,max_stored_bytes", [("llama", 2 << 30), ("qwen3", 2 << 30), ("llama", 0)])
def test_sequential_grams_equal_grams_of_the_compressed_model(arch, max_stored_bytes):
    model = make_tiny_model(arch)
    dense = copy.deepcopy(model)
    structure = decoder_structure(model)
    windows = _windows()
    wanted = [n for n in structure.all_targets if not n.endswith("v_proj")]  # some layers stay dense
    recorded = {}
    for stage in iterate_sequential_grams(model, structure, windows, 2, wanted, cross=True,
                                          max_stored_bytes=max_stored_bytes):
        for name in stage.layers:
            recorded[name] = (stage.gram, stage.cross)
        _compress_stage(model, stage)
    assert set(recorded) == set(wanted)
    assert sum(isinstance(m, SparseDictionaryLinear) for m in model.modules()) == len(wanted)
    grams, cross = _input_grams(model, wanted, windows, other=dense)
    for name in wanted:
        assert torch.allclose(recorded[name][0], grams[name], rtol=1e-9, atol=1e-9), name
        assert torch.allclose(recorded[name][1], cross[name], rtol=1e-9, atol=1e-9), name
    # compression upstream changes the inputs downstream: the last block's Grams differ from the dense ones
    dense_grams, _ = _input_grams(dense, wanted, windows)
    last = structure.targets[-1][0]
    assert not torch.allclose(grams[last], dense_grams[last], rtol=1e-3)


def test_upstream_corrected_factors_fit_dense_outputs_better():
    from rocketlm.factorization.refit import upstream_corrected_weight
    g = torch.Generator().manual_seed(0)
    X_d = torch.randn(400, 16, generator=g, dtype=torch.float64)
    X_c = X_d + 0.3 * torch.randn(400, 16, generator=g, dtype=torch.float64)  # upstream error
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    A_c, K = X_c.T @ X_c, X_c.T @ X_d
    S = whitening_factor(A_c)
    W_corr = upstream_corrected_weight(W, S, K)
    # normal equations of min ||X_d W - X_c W'||
    assert torch.allclose(X_c.T @ (X_c @ W_corr - X_d @ W), torch.zeros(16, 12, dtype=torch.float64), atol=1e-8)
    # no upstream error: the target is W itself
    S_d = whitening_factor(X_d.T @ X_d)
    assert torch.allclose(upstream_corrected_weight(W, S_d, X_d.T @ X_d), W, atol=1e-9)
    # compressed with the corrected target, the layer reproduces the dense outputs better
    config = RocketConfig(removed_ratio=0.5)
    k, s = candidate_shape(16, 12, 0.3, 2.0)
    plain = refit_factors(W, S, None, k, s, config)
    corrected = refit_factors(W, S, K, k, s, config)
    err = {name: float((X_c @ (f.U.double() @ f.V.double()) - X_d @ W).norm())
           for name, f in (("plain", plain), ("corrected", corrected))}
    assert err["corrected"] < err["plain"]


def test_alternating_refit_never_increases_the_error_and_keeps_the_mask():
    from rocketlm.factorization.refit import alternating_refit, refit_coefficients, refit_coefficients_cg
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    W = torch.randn(24, 20, generator=g, dtype=torch.float64)
    S = whitening_factor(X.T @ X)
    k, s = candidate_shape(24, 20, 0.4, 2.5)
    f = refit_factors(W, S, None, k, s, RocketConfig(removed_ratio=0.5, profile_dtype="float64", refine_iters=0))
    result = alternating_refit(W, S, f.U, f.V, f.mask, iterations=5)
    errors = result.error_output
    assert abs(errors[0] - f.closed_form_error_output) < 1e-9
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]
    assert torch.equal(result.V != 0, f.mask)
    # the coefficient step is the per-column least squares on the kept rows
    M, D = S @ W, S @ result.U
    C = refit_coefficients(M, D, f.mask)
    for j in (0, 7, 19):
        rows = f.mask[:, j].nonzero().flatten()
        expected = torch.linalg.lstsq(D[:, rows], M[:, j:j + 1]).solution.flatten()
        assert torch.allclose(C[rows, j], expected, atol=1e-8)
    # conjugate gradients (what the refinement runs) reach the same least squares from any start
    for start in (torch.zeros_like(C), C + 0.1 * torch.randn(C.shape, generator=g, dtype=C.dtype)):
        for chunk in (1024, 7):  # column chunks (the last one short) bound the work memory, same solution
            assert torch.allclose(refit_coefficients_cg(M, D, f.mask, start, chunk=chunk), C, atol=1e-8)
    # a dead atom (a zero column of D) gets 0 in every column that keeps it, as the direct solve gives it
    D_dead = D.clone()
    D_dead[:, 0] = 0.0
    C_dead = refit_coefficients_cg(M, D_dead, f.mask, C)
    assert torch.all(C_dead[0] == 0) and torch.allclose(C_dead, refit_coefficients(M, D_dead, f.mask), atol=1e-8)
    # a full mask (ks = 1): the same least squares, every column at once
    full = torch.ones_like(f.mask)
    expected = torch.linalg.lstsq(D, M).solution
    assert torch.allclose(refit_coefficients_cg(M, D, full, torch.zeros_like(C)), expected, atol=1e-8)


def test_refinement_lowers_every_layers_output_error_below_the_profiled_one(calib_file, tmp_path):
    """Refinement alone runs in the compression stage: each refined layer's output error (recomputed from
    the shipped factors and the cached Gram) is at most the closed form's, which is the profiled one."""
    from rocketlm.calibration.store import GramStore
    from rocketlm.factorization.sparse_dictionary import direct_errors
    from rocketlm.factorization.whitening import whitened_layers
    dense = make_tiny_model("llama")
    structure, dense_modules = decoder_structure(dense), dict(dense.named_modules())
    errors, choices = {}, {}
    for iters in (0, 2):
        model = make_tiny_model("llama")
        result = compress(model, make_tiny_tokenizer(), tiny_rocket_config(calib_file, refine_iters=iters),
                          cache_dir=tmp_path / "cache", progress=False)
        assert "refit" not in result.checks  # not the sequential stage
        modules, store = dict(model.named_modules()), GramStore(tmp_path / "cache", result.keys.calibration, {})
        choices = {c.name: c for c in result.allocation.choices if not c.dense}
        errors[iters] = {}
        for name, S, _ in whitened_layers(structure, store, choices.__contains__, result.config.whitening_eps, "cpu"):
            W_hat = modules[name].U.double() @ modules[name].dense_V().double()
            errors[iters][name] = direct_errors(weight_matrix(dense_modules[name]), S, W_hat)[1]
    assert errors[0] and errors[0].keys() == errors[2].keys() == choices.keys()
    for name, closed in errors[0].items():
        assert closed == pytest.approx(choices[name].error_output, abs=1e-4)
        assert errors[2][name] <= closed + 1e-6, name
    assert sum(errors[2].values()) < sum(errors[0].values()) - 1e-3


@pytest.mark.parametrize("options", [dict(sequential=True, upstream_correction=False, sequential_damping=0.0),
                                     dict(sequential=True, upstream_correction=True),
                                     dict(sequential=True, upstream_correction=True, refine_iters=1),
                                     dict(removed_ratio=0.5)])  # auto: on from SEQUENTIAL_AUTO_FROM_REMOVED
def test_pipeline_with_refits_saves_and_loads(options, calib_file, tmp_path):
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    result = compress(model, tok, tiny_rocket_config(calib_file, **options), cache_dir=tmp_path / "cache", progress=False)
    refit = result.checks["refit"]
    assert refit["layers"] == sum(not c.dense for c in result.allocation.choices) > 0
    with torch.no_grad():
        logits = model(tiny_ids()).logits
    save_compressed(result, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt", runtime="canonical")
    with torch.no_grad():
        assert torch.equal(loaded(tiny_ids()).logits, logits)
    assert RocketConfig.from_dict(result.config.to_dict()) == result.config
    assert result.config.sequential is True and refit["sequential"] is True  # the decided values are recorded
    assert refit["upstream_correction"] == result.config.upstream_correction is not None


def test_sequential_pass_runs_its_first_windows_only(calib_file, tmp_path):
    """``sequential_samples=N`` on the calibration windows is the pass over their first N windows."""
    from rocketlm.compression.sequential import compress_with_refits
    base = compress(make_tiny_model("llama"), make_tiny_tokenizer(),
                    tiny_rocket_config(calib_file, removed_ratio=0.5, sequential=False),
                    cache_dir=tmp_path / "cache", progress=False)
    windows = _windows(n=8, seq=32)
    config = base.config.replace(sequential=True, upstream_correction=True, sequential_damping=0.1)
    logits = []
    for ws, samples in ((windows, 3), (windows[:3], 64), (windows, 8)):
        model = make_tiny_model("llama")
        compress_with_refits(model, decoder_structure(model), base.allocation, None, ws,
                             config.replace(sequential_samples=samples), torch.float32, progress=False)
        with torch.no_grad():
            logits.append(model(tiny_ids()).logits)
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])  # the other windows would have changed the model
    with pytest.raises(ConfigError, match="sequential_samples"):
        RocketConfig(sequential_samples=0)


def test_the_pass_frees_what_it_has_replaced(calib_file, tmp_path, monkeypatch):
    """While the pass runs, the dense layers it has replaced are freed, and the blocks it has left hold their
    final (packed) modules, not the pass-time ones with a dense V: memory does not grow by a model per run."""
    import gc
    import weakref

    import rocketlm.compression.sequential as sequential
    base = compress(make_tiny_model("llama"), make_tiny_tokenizer(),
                    tiny_rocket_config(calib_file, removed_ratio=0.5, sequential=False),
                    cache_dir=tmp_path / "cache", progress=False)
    model = make_tiny_model("llama")
    structure = decoder_structure(model)
    block_of = {name: b for b, names in enumerate(structure.targets) for name in names}
    replaced: list[tuple[str, weakref.ref]] = []
    checked = []
    compress_layer = sequential._compress_layer

    def watched(modules, name, *args):
        gc.collect()
        assert all(ref() is None for _, ref in replaced), [n for n, ref in replaced if ref() is not None]
        for other, _ in replaced:
            kind = type(model.get_submodule(other))
            if block_of[other] < block_of[name]:
                assert kind is SparseDictionaryLinear, other
            else:
                assert kind is sequential._PassLinear, other
        replaced.append((name, weakref.ref(modules[name])))
        checked.append(name)
        return compress_layer(modules, name, *args)

    monkeypatch.setattr(sequential, "_compress_layer", watched)
    config = base.config.replace(sequential=True, upstream_correction=True, sequential_damping=0.1)
    sequential.compress_with_refits(model, structure, base.allocation, None, _windows(n=4, seq=32), config,
                                    torch.float32, progress=False)
    assert len({block_of[name] for name in checked}) > 1 and len(checked) == sum(
        not c.dense for c in base.allocation.choices)
    assert all(type(model.get_submodule(name)) is SparseDictionaryLinear for name in checked)


def test_auto_sequential_stays_off_below_its_threshold(calib_file, tmp_path):
    result = compress(make_tiny_model("llama"), make_tiny_tokenizer(), tiny_rocket_config(calib_file),
                      cache_dir=tmp_path / "cache", progress=False)
    assert result.config.removed_ratio < SEQUENTIAL_AUTO_FROM_REMOVED
    assert (result.config.sequential, result.config.upstream_correction, result.config.sequential_damping) == (
        False, False, 0.0)
    assert "refit" not in result.checks


def test_refits_are_deterministic(calib_file, tmp_path):
    outs = []
    for run in range(2):
        model = make_tiny_model("qwen2")
        compress(model, make_tiny_tokenizer(), tiny_rocket_config(calib_file, sequential=True, upstream_correction=True,
                                                       refine_iters=1), cache_dir=tmp_path / "cache", progress=False)
        with torch.no_grad():
            outs.append(model(tiny_ids()).logits)
    assert torch.equal(outs[0], outs[1])


def test_sensitivities_match_autograd_and_leave_weights_alone():
    model = make_tiny_model("llama")
    structure = decoder_structure(model)
    windows = _windows(n=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivities(model, structure, windows, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # direct: retain the output of one layer, backprop the summed NLL
    name = structure.targets[1][2]
    out = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    logits = model(input_ids=windows, use_cache=False).logits
    handle.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="sum")
    (grad,) = torch.autograd.grad(nll, out["y"])
    tokens = windows.numel()
    assert sens[name].grad_sq == pytest.approx(float(grad.double().square().sum()) / tokens, rel=1e-4)
    assert sens[name].out_sq == pytest.approx(float(out["y"].detach().double().square().sum()) / tokens, rel=1e-5)
    assert sens[name].sensitivity > 0


def test_fisher_cost_allocates_with_sensitivities_and_asks_for_them_otherwise(calib_file, tmp_path):
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    result = compress(model, tok, tiny_rocket_config(calib_file, cost="fisher", sensitivity_samples=2),
                      cache_dir=tmp_path / "cache", progress=False)
    assert result.allocation.cost == "fisher" and result.allocation.achieved_removed_ratio >= 0.3
    assert all(hasattr(p, "sensitivity") for p in result.profiles)
    stripped = [copy.copy(p) for p in result.profiles]
    for p in stripped:
        del p.sensitivity
    with pytest.raises(ValueError, match="sensitivities"):
        allocate(stripped, 0.3, "fisher")
    attach_sensitivities(stripped, {p.name: type("S", (), {"sensitivity": 1.0})() for p in stripped})
    assert allocate(stripped, 0.3, "fisher").achieved_removed_ratio >= 0.3


def test_config_and_cli_flags():
    with pytest.raises(ConfigError, match="sequential"):
        RocketConfig(sequential=False, upstream_correction=True)
    with pytest.raises(ConfigError, match="refine_iters"):
        RocketConfig(refine_iters=-1)
    with pytest.raises(ConfigError, match="sequential_damping=0.03 damps the sequential Grams"):
        RocketConfig(sequential=False, sequential_damping=0.03)
    with pytest.raises(ConfigError, match="offload='disk'"):
        RocketConfig(offload="disk", upstream_correction=True)
    with pytest.raises(ConfigError, match="sequential_damping"):
        RocketConfig(sequential=True, sequential_damping=-0.1)
    assert RocketConfig(sequential=True, sequential_damping=0.03).sequential_damping == 0.03
    from rocketlm.cli import _config_from_args, build_parser
    args = build_parser().parse_args(["compress", "m", "--ratio", "0.5", "--out", "x", "--sequential",
                                      "--upstream-correction", "--refine-iters", "3", "--cost", "fisher",
                                      "--sensitivity-samples", "4", "--sequential-samples", "16"])
    config = _config_from_args(args)
    assert (config.sequential, config.upstream_correction, config.refine_iters, config.cost,
            config.sensitivity_samples, config.sequential_samples) == (True, True, 3, "fisher", 4, 16)
    args = build_parser().parse_args(["compress", "m", "--ratio", "0.5", "--out", "x", "--no-sequential"])
    assert _config_from_args(args).sequential is False
    args = build_parser().parse_args(["compress", "m", "--ratio", "0.5", "--out", "x"])
    assert _config_from_args(args).sequential is None  # auto: decided by the run


@pytest.mark.parametrize("ratio, world_size, offloaded, expected", [
    (0.2, 1, False, (False, False, 0.0)),  # below the threshold: off
    (SEQUENTIAL_AUTO_FROM_REMOVED, 1, False, (True, True, SEQUENTIAL_AUTO_DAMPING)),  # from it on: on, corrected
    (0.5, 1, False, (True, True, SEQUENTIAL_AUTO_DAMPING)),
    (0.5, 2, False, (False, False, 0.0)),  # several processes: one-process only, so off
    (0.5, 1, True, (False, False, 0.0)),  # weights on disk: off
])
def test_auto_sequential_is_decided_by_ratio_and_where_it_can_run(ratio, world_size, offloaded, expected):
    config = decide_sequential(RocketConfig(removed_ratio=ratio), world_size, offloaded)
    assert (config.sequential, config.upstream_correction, config.sequential_damping) == expected


def test_explicit_sequential_options_are_kept_and_imply_sequential():
    explicit = RocketConfig(removed_ratio=0.5, sequential=True, upstream_correction=False, sequential_damping=0.03)
    assert decide_sequential(explicit) == explicit
    off = decide_sequential(RocketConfig(removed_ratio=0.5, sequential=False))
    assert (off.sequential, off.upstream_correction, off.sequential_damping) == (False, False, 0.0)
    on = decide_sequential(RocketConfig(removed_ratio=0.2, sequential=True))  # correction and damping follow
    assert (on.sequential, on.upstream_correction, on.sequential_damping) == (True, True, SEQUENTIAL_AUTO_DAMPING)
    needs = decide_sequential(RocketConfig(removed_ratio=0.2, upstream_correction=True))  # needs sequential
    assert (needs.sequential, needs.upstream_correction) == (True, True)
    with pytest.raises(ConfigError, match="one process"):  # an explicit request is refused, not dropped
        check_processes(decide_sequential(RocketConfig(removed_ratio=0.5, sequential=True), 2), 2)
def test_damping_is_least_squares_pulled_towards_the_original_weight():
    from rocketlm.factorization.refit import damped_grams, upstream_corrected_weight
    g = torch.Generator().manual_seed(2)
    X_d = torch.randn(50, 8, generator=g, dtype=torch.float64)
    X_c = X_d + 0.5 * torch.randn(50, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 5, generator=g, dtype=torch.float64)
    A, K = damped_grams(X_c.T @ X_c, X_c.T @ X_d, 0.1)
    lam = 0.1 * float((X_c.T @ X_c).diagonal().mean())
    # the augmented least squares [X_c; sqrt(l) I] W' ~ [X_d W; sqrt(l) W]
    X_aug = torch.cat([X_c, lam ** 0.5 * torch.eye(8, dtype=torch.float64)])
    Y_aug = torch.cat([X_d @ W, lam ** 0.5 * W])
    expected = torch.linalg.lstsq(X_aug, Y_aug).solution
    assert torch.allclose(upstream_corrected_weight(W, whitening_factor(A), K), expected, atol=1e-9)
    assert damped_grams(X_c.T @ X_c, None, 0.0)[1] is None


@pytest.mark.parametrize("stream", ["compressed", "dense"])
def test_sequential_calibration_refuses_a_non_finite_activation_of_either_stream(stream, monkeypatch):
    import rocketlm.calibration.sequential as sequential
    from rocketlm.calibration.grams import CalibrationError
    model = make_tiny_model("llama")
    structure = decoder_structure(model)
    if stream == "compressed":  # without the dense stream: only the compressed stream's Gram sees it
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    else:  # only the dense stream's input to block 1's o_proj (the cross-Gram's right-hand side)
        real = sequential._Streams._dense_input

        def poisoned(self, i, b, dense_block, block_name, first):
            x = real(self, i, b, dense_block, block_name, first)
            if first.endswith("layers.1.self_attn.o_proj"):
                x = x.clone()
                x[0, 1, 2] = float("inf")
            return x
        monkeypatch.setattr(sequential._Streams, "_dense_input", poisoned)
    expected = r"layers\.0\.mlp\.gate_proj" if stream == "compressed" else r"layers\.1\.self_attn\.o_proj"
    with pytest.raises(CalibrationError, match=expected + r" in sequential calibration"):
        for _ in iterate_sequential_grams(model, structure, _windows(), 2, structure.all_targets,
                                          cross=stream == "dense"):
            pass


def test_dense_inputs_stay_exact_when_a_layer_reads_the_block_input_itself():
    """The streams' block outputs are written over their inputs: a group whose layer reads the block's input
    tensor itself (here: no input norm) must keep a copy of it, not a view the next write overwrites."""
    model = make_tiny_model("llama")
    for layer in model.model.layers:
        layer.input_layernorm = torch.nn.Identity()
    dense = copy.deepcopy(model)
    structure = decoder_structure(model)
    windows = _windows(n=5)  # batches of 2, 2 and 1 windows
    recorded = {}
    for stage in iterate_sequential_grams(model, structure, windows, 2, structure.all_targets, cross=True):
        for name in stage.layers:
            recorded[name] = (stage.gram, stage.cross)
        _compress_stage(model, stage)
    grams, cross = _input_grams(model, list(recorded), windows, other=dense)
    for name in recorded:
        assert torch.allclose(recorded[name][0], grams[name], rtol=1e-9, atol=1e-9), name
        assert torch.allclose(recorded[name][1], cross[name], rtol=1e-9, atol=1e-9), name
