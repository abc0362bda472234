import math
import os
import warnings

import pytest
import torch

from lowrank.decompose.cp import CPDegeneracyWarning, cp_als, cp_reconstruct, conv_cp


def random_cp(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    return cp_reconstruct(torch.ones(rank, dtype=torch.float64), factors), factors


def resnet56_conv(name):
    path = f"{os.environ.get('LOWRANK_DATA', '')}/checkpoints/resnet56-4bfd9763.th"
    if not os.path.exists(path):
        pytest.skip("pretrained ResNet-56 not found: set LOWRANK_DATA")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"][f"module.{name}.weight"]


def best_match(true, found):
    """For each true column, the largest |cosine| with a found column: [R]."""
    true, found = true / true.norm(dim=0), found / found.norm(dim=0)
    return (true.T @ found).abs().max(dim=1).values


def test_recovers_an_exact_4way_cp_and_its_factors():
    W, factors = random_cp((10, 8, 3, 3), rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CPDegeneracyWarning)
        result = conv_cp(W, 4, form="4way", tol=1e-12, n_iter_max=2000)
    assert result.relative_error < 1e-5
    assert result.converged
    # Kruskal: the rank-4 CP of this tensor is unique up to scaling and order.
    for A, A_hat in zip(factors, result.factors):
        assert best_match(A, A_hat).min() > 1 - 1e-6
    assert torch.allclose(result.factors[0].norm(dim=0), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(result.reconstruct(), W, atol=1e-5 * W.norm())


def test_recovers_an_exact_cp_in_the_3way_form():
    W, _ = random_cp((10, 8, 3, 3), rank=5, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CPDegeneracyWarning)
        result = conv_cp(W, 5, form="3way", tol=1e-12, n_iter_max=2000)
    assert [A.shape for A in result.factors] == [(10, 5), (8, 5), (9, 5)]
    assert result.relative_error < 1e-5


def test_3way_merges_kernel_positions_row_major():
    W, factors = random_cp((6, 5, 3, 2), rank=3, seed=2)
    result = conv_cp(W, 3, form="3way", tol=1e-12, n_iter_max=2000)
    same = cp_als(W.reshape(6, 5, 6), 3, tol=1e-12, n_iter_max=2000)
    assert torch.equal(result.factors[2], same.factors[2])
    # Row i·kw + j of the merged factor is kernel position (i, j): each column, seen as a
    # [kh, kw] matrix, is the rank-one c_q d_qᵀ of a true component.
    merged = torch.stack([c[:, None] * d[None, :] for c, d in zip(factors[2].T, factors[3].T)], -1)
    assert best_match(merged.reshape(6, 3), result.factors[2]).min() > 1 - 1e-6
    assert torch.allclose(result.reconstruct().reshape(6, 5, 3, 2), W, atol=1e-6 * W.norm())


@pytest.mark.parametrize("line_search", [True, False])
def test_error_does_not_increase_over_sweeps(line_search):
    W = resnet56_conv("layer1.2.conv1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)   # without a ridge, terms start to cancel
        plain = conv_cp(W, 8, ridge=0.0, n_iter_max=100, line_search=line_search)
    h = torch.tensor(plain.history)
    assert (h[1:] <= h[:-1] + 1e-12).all()
    ridged = conv_cp(W, 8, n_iter_max=100, line_search=line_search)       # ridge ∝ error moves
    h = torch.tensor(ridged.history)
    assert (h[1:] <= h[:-1] + 1e-5).all()
    assert h[-1] < 0.9 * h[0]
    # The fit computed from Grams matches the reconstruction.
    assert abs(ridged.history[-1] - ridged.relative_error) < 1e-9


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_error_at_most_tensorlys_on_a_pretrained_conv(form):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    W = resnet56_conv("layer1.0.conv1").double()
    X = W if form == "4way" else W.reshape(16, 16, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # TensorLy warns that R > 3 SVD vectors exist
        cp = parafac(X.numpy(), 16, n_iter_max=100, tol=1e-6, init="svd", random_state=0)
    theirs = float(torch.linalg.norm(X - torch.as_tensor(tl.cp_to_tensor(cp))) / torch.linalg.norm(X))
    ours = conv_cp(W, 16, form=form, n_iter_max=100, tol=1e-6)
    assert ours.relative_error <= theirs


def classic_degenerate():
    """a⊗a⊗b + a⊗b⊗a + b⊗a⊗a: rank 3, a limit of rank-2 tensors, no best rank-2 approximation."""
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    outer = lambda x, y, z: x[:, None, None] * y[None, :, None] * z[None, None, :]
    return outer(a, a, b) + outer(a, b, a) + outer(b, a, a)


@pytest.mark.parametrize("kw", [{}, {"line_search": False}, {"init": "random"}])
def test_degenerate_best_rank2_warns(kw):
    X = classic_degenerate()
    with pytest.warns(CPDegeneracyWarning, match="degenerate"):
        result = cp_als(X, 2, **kw)
    assert result.relative_error < 0.05                     # the infimum, 0, is approached ...
    assert result.weights.abs().sum() > 1.5 * X.norm()      # ... by terms that cancel


def de_silva_lim():
    """e₁⊗e₁⊗e₂ + e₁⊗e₂⊗e₁ + e₂⊗e₁⊗e₁ [2, 2, 2] (de Silva & Lim 2008): no best rank-2 approximation.
    Its unfoldings have orthogonal singular vectors e₁, e₂, on which the SVD start lands exactly."""
    e1, e2 = torch.eye(2, dtype=torch.float64)
    outer = lambda x, y, z: x[:, None, None] * y[None, :, None] * z[None, None, :]
    return outer(e1, e1, e2) + outer(e1, e2, e1) + outer(e2, e1, e1)


def test_a_vanished_component_is_reported():
    # The SVD start gives component 2 a zero least-squares update, and ALS can never revive it:
    # the "rank-2" result is of rank 1 (error 0.816 = √(2/3)). Before: no warning at all.
    with pytest.warns(CPDegeneracyWarning, match=r"component\(s\) \[1\] vanished.*in effect of rank 1"):
        result = cp_als(de_silva_lim(), 2)
    assert result.relative_error == pytest.approx(math.sqrt(2 / 3), abs=1e-3)
    assert float(result.weights.abs().min()) < 1e-8
    with pytest.warns(CPDegeneracyWarning, match="degenerate"):      # the advice works: a random start
        assert cp_als(de_silva_lim(), 2, init="random").relative_error < 0.05   # ... approaches the infimum 0


@pytest.mark.parametrize("line_search", [True, False])
def test_a_singular_update_raises_and_says_what_to_do(line_search):
    # ridge=0 on the same tensor: the Gram matrix of modes 1 and 2 is singular (the vanished
    # component). Before: "cholesky_inverse: ... the input matrix is singular".
    with pytest.raises(torch.linalg.LinAlgError, match=r"mode\(s\) \[1, 2\] is singular.*Use ridge > 0"):
        cp_als(de_silva_lim(), 2, ridge=0, line_search=line_search)


def test_an_exact_fit_with_a_spare_component_stays_solvable():
    # A rank-1 tensor at rank 2: the fit becomes exact, and the ridge (scaled by the error) must
    # not vanish with it. Before: LinAlgError from cholesky_inverse with the default ridge.
    X = random_cp((4, 5, 6), rank=1, seed=3)[0]
    result = cp_als(X, 2)
    assert result.relative_error < 1e-6
    assert torch.isfinite(result.weights).all()


def test_no_warning_for_a_well_posed_rank():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CPDegeneracyWarning)
        cp_als(random_cp((6, 5, 4), rank=3, seed=6)[0], 3, tol=1e-10)
        conv_cp(resnet56_conv("layer2.0.conv1"), 16, n_iter_max=100)


def test_dtype_device_and_determinism():
    W = random_cp((7, 6, 3, 3), rank=3)[0].float()
    a, b = cp_als(W, 3, init="random", seed=3), cp_als(W, 3, init="random", seed=3)
    assert a.weights.dtype == torch.float32 and a.weights.shape == (3,)
    assert all(A.dtype == torch.float32 and A.device == W.device for A in a.factors)
    assert torch.equal(a.weights, b.weights) and a.history == b.history
    assert a.n_iter == len(a.history)


def test_rank_beyond_the_smaller_dimensions_pads_the_svd_start():
    W = random_cp((12, 10, 3, 3), rank=6, seed=4)[0]
    result = conv_cp(W, 6, tol=1e-12, n_iter_max=3000)      # R > kh, kw
    assert result.relative_error < 1e-5


@pytest.mark.parametrize("call", [
    lambda: cp_als(torch.randn(4, 5), 2),                            # a matrix
    lambda: cp_als(torch.randn(4, 5, 3), 0),
    lambda: cp_als(torch.randn(4, 5, 3), 16),                        # > 4·5·3 / 5
    lambda: cp_als(torch.randn(4, 5, 3), 2.5),
    lambda: cp_als(torch.randn(4, 5, 3), True),
    lambda: cp_als(torch.full((4, 5, 3), float("nan")), 2),
    lambda: cp_als(torch.zeros(4, 5, 3), 2),
    lambda: cp_als(torch.ones(4, 5, 3, dtype=torch.int64), 2),
    lambda: cp_als(torch.randn(4, 5, 3), 2, init="hosvd"),
    lambda: cp_als(torch.randn(4, 5, 3), 2, tol=-1.0),
    lambda: cp_als(torch.randn(4, 5, 3), 2, ridge=float("nan")),
    lambda: cp_als(torch.randn(4, 5, 3), 2, n_iter_max=0),
    lambda: conv_cp(torch.randn(4, 5, 3), 2),
    lambda: conv_cp(torch.randn(4, 5, 3, 3), 2, form="2way"),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


def test_cp_reconstruct_matches_the_sum_of_outer_products():
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(3, generator=g)
    factors = [torch.randn(n, 3, generator=g) for n in (4, 2, 3)]
    expected = sum(weights[q] * factors[0][:, q, None, None] * factors[1][None, :, q, None]
                   * factors[2][None, None, :, q] for q in range(3))
    assert torch.allclose(cp_reconstruct(weights, factors), expected, atol=1e-6)
    assert math.isclose(float(cp_reconstruct(weights, factors).norm()), float(expected.norm()), rel_tol=1e-6)
