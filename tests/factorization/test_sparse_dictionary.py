import math

import numpy as np
import pytest
import torch

from rocketlm.factorization.sparse_dictionary import (_ROW_ALIGN, _selected_T, candidate_shape, direct_errors,
                                                      factorize_candidate, factorize_next, kept_bytes, kept_values,
                                                      layer_basis, whitening_factor)


def _layer(d_in, d_out, n=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = n or 4 * d_in
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    return W, X.T @ X


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_full_rank_without_sparsity_reconstructs_W(shape):
    W, A = _layer(*shape)
    S = whitening_factor(A)
    basis = layer_basis(W, S, dtype=torch.float64)
    r = min(shape)
    fact = factorize_candidate(basis, r, r, with_factors=True)
    assert torch.allclose(fact.U @ fact.V, W, atol=1e-8)
    assert fact.error_weight < 1e-6 and fact.error_output < 1e-6


def test_whitening_factor_is_upper_cholesky_and_handles_singular_gram():
    W, A = _layer(16, 8)
    S = whitening_factor(A)
    assert torch.allclose(S.T @ S, A, rtol=1e-10, atol=1e-10)
    assert torch.equal(S, torch.triu(S))
    X = torch.randn(4, 16, dtype=torch.float64)  # rank 4 < 16: not positive definite
    S = whitening_factor(X.T @ X)
    assert torch.isfinite(S).all() and torch.equal(S, torch.triu(S))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_profiled_errors_equal_direct_formulas(shape, dtype, tol):
    W, A = _layer(*shape, seed=1)
    S = whitening_factor(A)
    X_metric = S  # ||X E|| = ||S E||
    basis = layer_basis(W, S, dtype=dtype)
    for removed, ks in [(0.1, 1.0), (0.3, 1.5), (0.5, 2.0), (0.7, 3.0)]:
        k, s = candidate_shape(*shape, removed, ks)
        fact = factorize_candidate(basis, k, s, with_factors=True)
        W_hat = fact.U.double() @ fact.V.double()
        e_w = float((W - W_hat).norm() / W.norm())
        e_o = float((X_metric @ (W - W_hat)).norm() / (X_metric @ W).norm())
        assert fact.error_weight == pytest.approx(e_w, abs=tol)
        assert fact.error_output == pytest.approx(e_o, abs=tol)
        assert (e_w, e_o) == pytest.approx(direct_errors(W, S, W_hat), abs=1e-12)
        # structure: exactly s nonzeros per column of V, dense U of d_in x k
        assert fact.U.shape == (shape[0], k)
        assert bool(((fact.V != 0).sum(dim=0) <= s).all()) and int(fact.mask.sum()) == s * shape[1]


def test_output_error_equals_relative_error_on_calibration_activations():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    W = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    S = whitening_factor(X.T @ X)
    fact = factorize_candidate(layer_basis(W, S, dtype=torch.float64), 8, 5, with_factors=True)
    W_hat = fact.U @ fact.V
    assert fact.error_output == pytest.approx(float((X @ W - X @ W_hat).norm() / (X @ W).norm()), rel=1e-9)


def test_sparsity_keeps_largest_importance_per_column():
    W, A = _layer(30, 20, seed=4)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    k, s = 12, 4
    fact = factorize_candidate(basis, k, s, with_factors=True)
    importance = basis.B[:k].abs() * basis.atom_weight[:k, None]
    for j in range(20):
        kept = importance[fact.mask[:, j], j]
        dropped = importance[~fact.mask[:, j], j]
        assert kept.min() >= dropped.max()


def test_error_does_not_grow_as_kept_parameters_grow():
    W, A = _layer(64, 96, seed=5)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    # no sparsity (s = k): nested subspaces, the output error is exactly non-increasing in k
    errors = [factorize_candidate(basis, k, k).error_output for k in range(1, 65)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    # along the grid at fixed ks, fewer removed parameters never cost more error (both errors)
    for ks in (1.0, 1.5, 2.0, 3.0):
        shapes = [candidate_shape(64, 96, r / 20, ks) for r in range(14, 0, -1)]
        facts = [factorize_candidate(basis, k, s) for k, s in shapes if k <= 64]
        for a, b in zip(facts, facts[1:]):
            assert b.error_output <= a.error_output + 1e-9
            assert b.error_weight <= a.error_weight + 1e-9


def test_dictionary_refit_never_worse_than_the_plain_basis():
    W, A = _layer(40, 60, seed=6)
    S = whitening_factor(A)
    basis = layer_basis(W, S, dtype=torch.float64)
    M = S @ W
    Q = torch.linalg.svd(M, full_matrices=False).U
    for k, s in [(10, 3), (20, 10), (30, 30)]:
        fact = factorize_candidate(basis, k, s, with_factors=True)
        plain = float((M - Q[:, :k] @ fact.V).norm() / M.norm())
        assert fact.error_output <= plain + 1e-12


def test_candidate_shape_and_sizes_follow_the_formulas():
    d_in, d_out = 576, 1536
    k, s = candidate_shape(d_in, d_out, 0.3, 2.0)
    assert k == math.floor(0.7 * d_in * d_out / (d_in + d_out / 2.0)) and s == math.floor(k / 2.0)
    assert kept_values(d_in, d_out, k, s) == d_in * k + d_out * s
    assert kept_values(d_in, d_out, k, s) <= 0.7 * d_in * d_out
    assert kept_bytes(d_in, d_out, k, s, 2) == 2 * (d_in * k + d_out * s) + math.ceil(k * d_out / 8)


def test_invalid_candidate_is_rejected():
    W, A = _layer(8, 6)
    basis = layer_basis(W, whitening_factor(A))
    with pytest.raises(ValueError):
        factorize_candidate(basis, 7, 2)  # k > rank
    with pytest.raises(ValueError):
        factorize_candidate(basis, 4, 0)


def _assert_errors_are_direct(W, S, fact, tol=1e-9):
    e_w, e_o = direct_errors(W, S, fact.U.double() @ fact.V.double())
    assert fact.error_weight == pytest.approx(e_w, abs=tol)
    assert fact.error_output == pytest.approx(e_o, abs=tol)


def test_atoms_that_keep_no_entry_are_handled_exactly():
    # 6 columns with 1 nonzero each: at most 6 of the 30 atoms are used, so C C^T is singular
    W, A = _layer(40, 6, seed=7)
    W = torch.cat([W, W[:, :1]], dim=1)  # duplicate column: the same atom wins twice
    S = whitening_factor(A)
    basis = layer_basis(W, S, dtype=torch.float64)
    with pytest.raises(ValueError):
        factorize_candidate(basis, 30, 1)  # k > rank 7
    fact = factorize_candidate(basis, 7, 1, with_factors=True)
    unused = ~fact.mask.any(dim=1)
    assert bool(unused.any())
    assert torch.all(fact.U[:, unused] == 0)  # an unused atom's dictionary column multiplies nothing
    _assert_errors_are_direct(W, S, fact)


@pytest.mark.parametrize("ridge_rel", [1e-3, 0.1])
def test_ridge_refit_errors_equal_direct_formulas(ridge_rel):
    W, A = _layer(30, 50, seed=8)
    S = whitening_factor(A)
    basis = layer_basis(W, S, dtype=torch.float64)
    for k, s in [(20, 8), (25, 25)]:
        fact = factorize_candidate(basis, k, s, ridge_rel=ridge_rel, with_factors=True)
        _assert_errors_are_direct(W, S, fact)
        plain = factorize_candidate(basis, k, s)
        assert fact.error_output >= plain.error_output - 1e-12  # the ridge only moves away from least squares


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_badly_conditioned_layer_stays_exact(shape):
    W, A = _layer(*shape, seed=9)
    U, sig, Vt = torch.linalg.svd(W, full_matrices=False)
    sig[-3:] = sig[0] * torch.tensor([1e-7, 1e-8, 1e-9], dtype=torch.float64)  # condition ~1e9
    W = U @ torch.diag(sig) @ Vt
    S = whitening_factor(A)
    basis = layer_basis(W, S, dtype=torch.float64)
    r = min(shape)
    fact = factorize_candidate(basis, r, r, with_factors=True)
    assert torch.allclose(fact.U @ fact.V, W, atol=1e-8)
    for k, s in [(r - 4, r - 4), (r // 2, r // 4)]:
        _assert_errors_are_direct(W, S, factorize_candidate(basis, k, s, with_factors=True), tol=1e-7)


def test_selection_is_the_top_s_by_importance_with_ties_to_the_lower_atom():
    W, A = _layer(40, 64, seed=10)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    basis.Bt[:, 3] = basis.Bt[:, 5] * basis.atom_weight[5] / basis.atom_weight[3]  # exact importance ties
    from rocketlm.factorization.sparse_dictionary import _importance_order
    basis.order, basis.position = _importance_order(basis.Bt, basis.atom_weight)
    importance = basis.Bt.abs() * basis.atom_weight  # d_out x r
    for k, s in [(40, 7), (23, 11), (12, 1), (30, 29)]:
        expected = torch.zeros(64, k, dtype=torch.bool)
        ranked = importance[:, :k].argsort(dim=1, descending=True, stable=True)[:, :s]
        expected.scatter_(1, ranked, True)
        assert torch.equal(_selected_T(basis, k, s), expected), (k, s)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_incremental_candidates_equal_the_direct_computation(shape, dtype, tol, compiled, monkeypatch):
    from rocketlm.factorization import sparse_dictionary
    monkeypatch.setattr(sparse_dictionary, "COMPILED_STEPS", compiled)  # the compiled step plan, or torch's
    W, A = _layer(*shape, seed=11)
    basis = layer_basis(W, whitening_factor(A), dtype=dtype)
    exact = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    for ks in (1.0, 1.5, 2.0, 3.0):
        state = None
        # removed up and down again: k shrinks and grows, small steps go incremental, big ones dense
        for removed in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.45, 0.7, 0.1):
            k, s = candidate_shape(*shape, removed, ks)
            if k > basis.rank:
                continue
            fact, state = factorize_next(basis, k, s, state)
            ref = factorize_candidate(exact, k, s)
            assert fact.error_weight == pytest.approx(ref.error_weight, abs=tol)
            assert fact.error_output == pytest.approx(ref.error_output, abs=tol)
            if state is not None:  # C^T held exactly, in rows that start aligned (views of wider buffers)
                assert torch.equal(state.CT, basis.Bt[:, :k] * _selected_T(basis, k, s))
                assert state.CT.stride() == (state.CT.stride(0), 1) and state.CT.stride(0) % _ROW_ALIGN == 0


def test_changed_entries_sort_into_csr_order_as_their_keys_do():
    from rocketlm.factorization.sparse_dictionary import _by_atom
    gen = torch.Generator().manual_seed(3)
    d_out, k = 300, 120
    # as _delta_entries lists them: atoms that changed, then atoms new to the dictionary, each group by column
    kept = torch.rand(d_out, k, generator=gen) < 0.05
    groups = [kept[:, :80].nonzero(), kept[:, 80:].nonzero() + torch.tensor([0, 80])]
    cols = torch.cat([g[:, 0] for g in groups])
    atoms = torch.cat([g[:, 1] for g in groups])
    expected = torch.from_numpy(np.argsort((atoms * d_out + cols).numpy()))
    assert torch.equal(_by_atom(atoms, k), expected)
    assert torch.equal(_by_atom(atoms, 1 << 16), expected)  # beyond 16-bit atoms: torch's stable sort


def test_float32_errors_stay_within_1e4_of_float64_even_when_small():
    # a nearly low-rank layer: errors of 1e-3 .. 1e-1, where float32 cancellation would show
    W, A = _layer(96, 160, seed=12)
    U, sig, Vt = torch.linalg.svd(W, full_matrices=False)
    W = U @ torch.diag(sig * torch.logspace(0, -4, sig.numel(), dtype=torch.float64)) @ Vt
    b32 = layer_basis(W, whitening_factor(A), dtype=torch.float32)
    b64 = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    smallest = 1.0
    for removed in (0.05, 0.2, 0.4, 0.6):
        for ks in (1.2, 1.5, 2.0, 3.0):
            k, s = candidate_shape(96, 160, removed, ks)
            if k > 96:
                continue
            f32, f64 = factorize_candidate(b32, k, s), factorize_candidate(b64, k, s)
            smallest = min(smallest, f64.error_output)
            assert abs(f32.error_output - f64.error_output) < 1e-4 and abs(f32.error_weight - f64.error_weight) < 1e-4
    assert smallest < 0.02  # the float64 refinement path was exercised


def test_thresholds_found_near_the_previous_ones_equal_the_direct_ones():
    from rocketlm.factorization.sparse_dictionary import _thresholds, _thresholds_near
    W, A = _layer(64, 96, seed=13)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        k1, k2 = (int(v) for v in torch.randint(2, 65, (2,), generator=gen))
        s1, s2 = int(torch.randint(1, k1, (1,), generator=gen)), int(torch.randint(1, k2, (1,), generator=gen))
        _, state = factorize_next(basis, k1, s1, None)
        assert torch.equal(_thresholds_near(basis, state, k2, s2), _thresholds(basis, k2, s2)), (k1, s1, k2, s2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_step_plan_equals_torchs(dtype, monkeypatch):
    from rocketlm.factorization import sparse_dictionary, step_kernel
    assert step_kernel.available(torch.device("cpu"))  # numba is a dependency: CI must run the compiled path
    W, A = _layer(64, 96, seed=15)
    basis = layer_basis(W, whitening_factor(A), dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    pairs = [(40, 20, 40, 20), (40, 20, 40, 21), (40, 20, 38, 20), (40, 20, 44, 22), (64, 63, 2, 1), (2, 1, 64, 63)]
    for _ in range(60):
        k1, k2 = (int(v) for v in torch.randint(2, 65, (2,), generator=gen))
        s1, s2 = int(torch.randint(1, k1, (1,), generator=gen)), int(torch.randint(1, k2, (1,), generator=gen))
        pairs.append((k1, s1, k2, s2))
    for k1, s1, k2, s2 in pairs:
        _, state = factorize_next(basis, k1, s1, None)
        plans = []
        for compiled in (True, False):
            monkeypatch.setattr(sparse_dictionary, "COMPILED_STEPS", compiled)
            plans.append(sparse_dictionary._step_plan(basis, state, k2, s2))
        (thr, delta), (thr_ref, delta_ref) = plans
        assert torch.equal(thr, thr_ref), (k1, s1, k2, s2)
        assert thr.dtype == torch.int32 and thr.shape == (96, 1)
        for got, ref in zip(delta, delta_ref):
            assert got.dtype == ref.dtype and torch.equal(got, ref), (k1, s1, k2, s2)
        # the entries are exactly what changed: applying them to the old C gives the new one
        crow, atoms, cols, values = delta
        C_old = basis.Bt[:, :k1] * _selected_T(basis, k1, s1)
        C_new = torch.zeros(96, k2, dtype=dtype)
        common = min(k1, k2)
        C_new[:, :common] = C_old[:, :common]
        C_new.index_put_((cols, atoms), values, accumulate=True)
        assert torch.equal(C_new, basis.Bt[:, :k2] * _selected_T(basis, k2, s2)), (k1, s1, k2, s2)
        assert torch.equal(crow[1:] - crow[:-1], torch.bincount(atoms, minlength=k2))  # CSR rows: by atom
        assert bool((atoms.diff() >= 0).all())


def test_without_numba_profiling_takes_torchs_path_and_says_so_once(monkeypatch, caplog):
    from rocketlm.factorization import step_kernel
    monkeypatch.setattr(step_kernel, "_compiled", None)  # as where numba is not installed
    monkeypatch.setattr(step_kernel, "_warned", False)
    W, A = _layer(48, 96, seed=16)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    state = None
    with caplog.at_level("WARNING", logger="rocketlm.factorization.step_kernel"):
        for removed in (0.1, 0.15, 0.2, 0.25):
            k, s = candidate_shape(48, 96, removed, 2.0)
            fact, state = factorize_next(basis, k, s, state)
            assert fact.error_output == pytest.approx(factorize_candidate(basis, k, s).error_output, abs=1e-10)
    assert state.steps == 3  # the sparse steps ran, on torch's path
    assert [r.message for r in caplog.records].count(
        "numba is not installed: profiling takes torch's slower path for its sparse steps (pip install numba)") == 1
    assert not step_kernel.available(torch.device("meta"))  # other devices: torch's path, no warning needed


def test_sparse_updates_chain_at_most_max_sparse_steps_then_go_dense():
    from rocketlm.factorization.sparse_dictionary import MAX_SPARSE_STEPS
    W, A = _layer(96, 192, seed=14)
    basis = layer_basis(W, whitening_factor(A), dtype=torch.float32)
    exact = layer_basis(W, whitening_factor(A), dtype=torch.float64)
    state, steps = None, []
    for removed in np.linspace(0.05, 0.55, 41):  # small steps: each one incremental unless the chain is capped
        k, s = candidate_shape(96, 192, float(removed), 2.0)
        fact, state = factorize_next(basis, k, s, state)
        steps.append(state.steps)
        ref = factorize_candidate(exact, k, s)
        assert fact.error_output == pytest.approx(ref.error_output, abs=2e-5)
    assert max(steps) == MAX_SPARSE_STEPS and steps[MAX_SPARSE_STEPS + 1] == 0  # dense again after the cap
