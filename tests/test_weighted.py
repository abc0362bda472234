import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowrank as lr
from lowrank.decompose.cp import CPDegeneracyWarning, CPResult, conv_cp, cp_reconstruct
from lowrank.decompose.svd import channel_matrix, truncated_svd
from lowrank.decompose.tucker import hooi, hosvd, relative_error, tucker2_reconstruct
from lowrank.decompose.weighted import (Whitening, weighted_cp, weighted_error, weighted_svd,
                                        weighted_tucker2, whitening)


def spd(d, seed=0, decay=3.0, dtype=torch.float64):
    """A random SPD [d, d] matrix with eigenvalues from 1 down to exp(-decay)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))[0]
    lam = torch.exp(-decay * torch.rand(d, generator=g, dtype=dtype))
    return (Q * lam) @ Q.T


def kernel(T=10, S=6, kh=3, kw=3, seed=1):
    return torch.randn(T, S, kh, kw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sigma_error(W, W_hat, Sigma):
    """‖(W − Ŵ) Σ^{1/2}‖ / ‖W Σ^{1/2}‖ through the symmetric square root (independent of the module)."""
    lam, Q = torch.linalg.eigh(Sigma)
    root = (Q * lam.clamp(min=0).sqrt()) @ Q.T
    T = W.shape[0]
    return float(torch.linalg.norm((W - W_hat).reshape(T, -1) @ root) / torch.linalg.norm(W.reshape(T, -1) @ root))


def nonincreasing(history, rtol=1e-10):
    return all(b <= a * (1 + rtol) for a, b in zip(history, history[1:]))


# --- whitening ---------------------------------------------------------------------------------

def test_whitening_factor_and_inverse():
    Sigma = spd(20)
    wh = whitening(Sigma)
    assert isinstance(wh, Whitening)
    assert torch.allclose(wh.L @ wh.L.T, Sigma, atol=1e-12)
    X = torch.randn(5, 20, dtype=torch.float64)
    assert torch.allclose(wh.unwhiten(wh.whiten(X)), X, atol=1e-10)
    assert torch.allclose(wh.whiten(X).square().sum(), torch.trace(X @ Sigma @ X.T))
    lam = torch.linalg.eigvalsh(Sigma)
    assert torch.allclose(wh.eigenvalues, lam.flip(0))
    assert wh.condition == pytest.approx(float(lam[-1] / lam[0]))
    assert wh.raw_condition == pytest.approx(wh.condition)
    assert 1 < wh.effective_rank < 20 and wh.numerical_rank == 20


def test_effective_rank_extremes():
    assert whitening(torch.eye(7)).effective_rank == pytest.approx(7)
    v = torch.randn(7, dtype=torch.float64)
    assert whitening(torch.outer(v, v)).effective_rank == pytest.approx(1, abs=1e-6)


def test_whitening_singular_sigma():
    Sigma = spd(12)
    Sigma[:, 3] = Sigma[3, :] = 0            # a dead input: zero row and column
    wh = whitening(Sigma, rel_floor=1e-8)
    assert wh.raw_condition == float("inf") or wh.raw_condition > 1e14
    assert wh.condition == pytest.approx(1e8)
    assert wh.numerical_rank == 11
    assert torch.isfinite(wh.L).all() and torch.isfinite(wh.unwhiten(torch.ones(1, 12))).all()
    assert torch.allclose(wh.sigma, Sigma, atol=1e-7 * float(wh.eigenvalues[0]))


@pytest.mark.parametrize("bad, match", [
    (torch.ones(3, 4), "square"),
    (torch.ones(2, 2, 2), "square"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN"),
    (torch.diag(torch.tensor([1.0, -0.1])), "semi-definite"),
    (torch.zeros(3, 3), "zero"),
    (torch.eye(3, dtype=torch.int64), "floating"),
])
def test_whitening_rejects_bad_sigma(bad, match):
    with pytest.raises(ValueError, match=match):
        whitening(bad)


def test_whitening_rejects_bad_floor():
    with pytest.raises(ValueError, match="rel_floor"):
        whitening(torch.eye(3), rel_floor=0)


# --- weighted_error ----------------------------------------------------------------------------

def test_weighted_error_identity_and_definition():
    W, W_hat = kernel(), kernel(seed=2)
    d = W[0].numel()
    assert weighted_error(W, W_hat, torch.eye(d)) == pytest.approx(relative_error(W, W_hat))
    Sigma = spd(d)
    assert weighted_error(W, W_hat, Sigma) == pytest.approx(sigma_error(W, W_hat, Sigma))
    assert weighted_error(W, W, Sigma) == 0
    with pytest.raises(ValueError, match="d = 54"):
        weighted_error(W, W_hat, torch.eye(10))
    with pytest.raises(ValueError, match="same shape"):
        weighted_error(W, W_hat[:3], Sigma)
    with pytest.raises(ValueError, match="never occur"):
        Z = torch.zeros(d, d, dtype=torch.float64)
        Z[0, 0] = 1
        W0 = W.clone().reshape(10, -1)
        W0[:, 0] = 0
        weighted_error(W0, W0 + 1, Z)


# --- weighted_svd ------------------------------------------------------------------------------

def test_weighted_svd_identity_is_truncated_svd():
    W = kernel().reshape(10, -1)
    A, B = weighted_svd(W, torch.eye(W.shape[1]), 4)
    U, s, Vh = truncated_svd(W, 4)
    assert torch.allclose(A @ B, U @ torch.diag(s) @ Vh, atol=1e-10)
    assert torch.allclose(A.T @ A, torch.eye(4, dtype=W.dtype), atol=1e-12)


def test_weighted_svd_is_optimal():
    W = kernel(T=12, S=5).reshape(12, -1)
    Sigma = spd(W.shape[1], decay=6.0)
    r = 3
    A, B = weighted_svd(W, Sigma, r)
    best = weighted_error(W, A @ B, Sigma)
    # Eckart–Young for W Σ^{1/2}: the tail of its singular values
    s = torch.linalg.svdvals(W @ whitening(Sigma).L)
    assert best == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-9)
    U, sv, Vh = truncated_svd(W, r)
    assert best < weighted_error(W, U @ torch.diag(sv) @ Vh, Sigma) - 1e-3
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        if i % 2:   # a small perturbation of the optimum
            eps = 0.05 * torch.rand(1, generator=g, dtype=W.dtype)
            W_alt = (A + eps * torch.randn(A.shape, generator=g, dtype=W.dtype)) @ \
                    (B + eps * torch.randn(B.shape, generator=g, dtype=W.dtype))
        else:       # W projected on a random r-dimensional subspace of outputs
            P = torch.linalg.qr(torch.randn(12, r, generator=g, dtype=W.dtype))[0]
            W_alt = P @ P.T @ W
        assert best <= weighted_error(W, W_alt, Sigma) + 1e-12


def test_weighted_svd_full_rank_exact_and_dtype():
    W = kernel().reshape(10, -1).float()
    A, B = weighted_svd(W, spd(W.shape[1]), 10)
    assert A.dtype == B.dtype == torch.float32
    assert torch.allclose(A @ B, W, atol=1e-5)


def test_weighted_svd_bad_input():
    W = kernel().reshape(10, -1)
    with pytest.raises(ValueError):
        weighted_svd(W, torch.eye(54), 0)
    with pytest.raises(ValueError):
        weighted_svd(W, torch.eye(54), 11)
    with pytest.raises(ValueError, match="d = 54"):
        weighted_svd(W, torch.eye(53), 2)
    with pytest.raises(ValueError):
        weighted_svd(kernel(), torch.eye(54), 2)        # a 4-D kernel: pass channel_matrix(W)
    with pytest.raises(ValueError, match="NaN"):
        weighted_svd(W * float("nan"), torch.eye(54), 2)


# --- weighted_tucker2 --------------------------------------------------------------------------

def test_tucker2_identity_sigma_matches_hosvd_and_hooi():
    W = kernel(T=12, S=10)
    core, U_T, U_S, history = weighted_tucker2(W, torch.eye(90), (5, 4), n_iter=100, tol=1e-10)
    assert history[0] == pytest.approx(relative_error(W, tucker2_reconstruct(*hosvd(W, (5, 4)))))
    err = relative_error(W, tucker2_reconstruct(core, U_T, U_S))
    assert err == pytest.approx(min(history))
    assert err == pytest.approx(relative_error(W, tucker2_reconstruct(*hooi(W, (5, 4), n_iter=200))), rel=1e-3)
    assert nonincreasing(history)


def test_tucker2_descends_and_beats_frobenius():
    W = kernel(T=12, S=10, seed=3)
    Sigma = spd(90, seed=4, decay=8.0)
    core, U_T, U_S, history = weighted_tucker2(W, Sigma, (6, 5), n_iter=30)
    assert nonincreasing(history) and history[-1] < history[0] - 1e-3
    W_hat = tucker2_reconstruct(core, U_T, U_S)
    assert weighted_error(W, W_hat, Sigma) == pytest.approx(min(history), rel=1e-9)
    assert weighted_error(W, W_hat, Sigma) < weighted_error(W, tucker2_reconstruct(*hooi(W, (6, 5))), Sigma)
    assert torch.allclose(U_T.T @ U_T, torch.eye(6, dtype=W.dtype), atol=1e-10)
    assert torch.allclose(U_S.T @ U_S, torch.eye(5, dtype=W.dtype), atol=1e-10)
    assert core.shape == (6, 5, 3, 3)


def test_tucker2_one_sided_is_weighted_svd():
    W = kernel(T=12, S=6)
    Sigma = spd(54, decay=5.0)
    core, U_T, U_S, history = weighted_tucker2(W, Sigma, (4, 6))
    assert torch.equal(U_S, torch.eye(6, dtype=W.dtype)) and len(history) == 2
    U_T0 = hosvd(W, (4, 6))[1]
    assert history[0] == pytest.approx(weighted_error(W, (U_T0 @ U_T0.T @ W.reshape(12, -1)).reshape(W.shape), Sigma))
    A, B = weighted_svd(channel_matrix(W), Sigma, 4)
    assert torch.allclose(tucker2_reconstruct(core, U_T, U_S).reshape(12, -1), A @ B, atol=1e-10)


def test_tucker2_full_ranks_exact():
    W = kernel(T=7, S=5).float()
    core, U_T, U_S, _ = weighted_tucker2(W, spd(45), (7, 5))
    assert core.dtype == torch.float32
    assert torch.allclose(tucker2_reconstruct(core, U_T, U_S), W, atol=1e-5)


@pytest.mark.parametrize("kind", ["singular", "ill-conditioned"])
def test_hard_sigmas_give_finite_results(kind):
    W = kernel(T=12, S=8, seed=5)
    d = 72
    if kind == "singular":      # dead input channels 2 and 5: zero rows and columns of Σ
        Sigma = spd(d, seed=6)
        for s in (2, 5):
            Sigma[s * 9:(s + 1) * 9] = 0
            Sigma[:, s * 9:(s + 1) * 9] = 0
    else:                       # condition number 1e12
        g = torch.Generator().manual_seed(7)
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        Sigma = (Q * torch.logspace(0, -12, d, dtype=torch.float64)) @ Q.T
    A, B = weighted_svd(channel_matrix(W), Sigma, 5)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    core, U_T, U_S, history = weighted_tucker2(W, Sigma, (6, 4), n_iter=10)
    assert all(np.isfinite(history)) and nonincreasing(history, rtol=1e-8)
    W_hat = tucker2_reconstruct(core, U_T, U_S)
    assert torch.isfinite(W_hat).all()
    assert W_hat.abs().max() < 10 * W.abs().max()     # no blow-up in the directions Σ ignores
    assert weighted_error(W, W_hat, Sigma) <= weighted_error(W, tucker2_reconstruct(*hosvd(W, (6, 4))), Sigma) + 1e-9
    result = weighted_cp(W, Sigma, 6, n_iter=5)
    assert all(np.isfinite(result.history)) and nonincreasing(result.history, rtol=1e-8)
    assert torch.isfinite(result.reconstruct()).all()


def test_tucker2_bad_input():
    W = kernel()
    for ranks in [(0, 2), (3, 7), (11, 2)]:
        with pytest.raises(ValueError):
            weighted_tucker2(W, torch.eye(54), ranks)
    with pytest.raises(ValueError, match="d = 54"):
        weighted_tucker2(W, torch.eye(27), (3, 3))
    with pytest.raises(ValueError):
        weighted_tucker2(W.reshape(10, -1), torch.eye(54), (3, 3))
    with pytest.raises(ValueError, match="n_iter"):
        weighted_tucker2(W, torch.eye(54), (3, 3), n_iter=-1)
    with pytest.raises(ValueError, match="zero"):
        weighted_tucker2(torch.zeros_like(W), torch.eye(54), (3, 3))


def test_tucker2_one_by_one_kernel_is_the_weighted_svd():
    # k = 1: G ×₁ U_T ×₂ U_S is any T × S matrix of rank ≤ min(rT, rS), so the optimum is the
    # weighted SVD at that rank, in closed form (the ALS never runs).
    W = kernel(T=12, S=20, kh=1, kw=1, seed=11)
    Sigma = spd(20, seed=12, decay=6.0)
    for ranks in [(3, 7), (7, 3), (5, 5)]:
        core, U_T, U_S, history = weighted_tucker2(W, Sigma, ranks)
        assert core.shape == (*ranks, 1, 1) and len(history) == 2
        A, B = weighted_svd(W.reshape(12, 20), Sigma, min(ranks))
        assert torch.allclose(tucker2_reconstruct(core, U_T, U_S).reshape(12, 20), A @ B, atol=1e-10)
        assert torch.allclose(U_T.T @ U_T, torch.eye(ranks[0], dtype=W.dtype), atol=1e-10)
        assert torch.allclose(U_S.T @ U_S, torch.eye(ranks[1], dtype=W.dtype), atol=1e-10)
        assert history[1] < history[0]


def test_tucker2_rejects_a_sigma_that_is_not_psd():
    W = kernel(T=8, S=6, seed=13)
    Sigma = spd(54, seed=14)
    Q = torch.linalg.eigh(Sigma).eigenvectors
    indefinite = Sigma - 2 * torch.outer(Q[:, -1], Q[:, -1])      # largest eigenvalue made negative
    with pytest.raises(ValueError, match="positive semi-definite|zero"):
        weighted_tucker2(W, indefinite, (3, 3))


def dense_tucker2(W, Sigma, ranks, n_iter, tol=1e-6):
    """The previous weighted_tucker2 (before the conjugate gradients), kept as the reference: the
    same closed-form (U_T, G) step, then U_S ← U_S + U_⊥ X with X the exact solution of the
    (S − rS)·rS dense normal equations. Returns its best relative Σ-error (start included)."""
    (T, S, kh, kw), (rT, rS) = W.shape, ranks
    k, d, n = kh * kw, S * kh * kw, S - ranks[1]
    Sig4, W2 = Sigma.reshape(S, k, S, k), W.reshape(T, d)
    WSig = W2 @ Sigma
    core, U_T, U_S = hosvd(W, ranks)
    errors = [weighted_error(W, tucker2_reconstruct(core, U_T, U_S), Sigma)]
    for it in range(n_iter):
        WSigK = torch.einsum("tsp,sj->tjp", WSig.reshape(T, S, k), U_S).reshape(T, rS * k)
        R = torch.linalg.cholesky(torch.einsum("spuq,sj,ul->jplq", Sig4, U_S, U_S).reshape(rS * k, rS * k))
        U_T = torch.linalg.svd(torch.linalg.solve_triangular(R, WSigK.T, upper=False).T)[0][:, :rT]
        core = torch.cholesky_solve((U_T.T @ WSigK).T, R).T.reshape(rT, rS, kh, kw)
        errors.append(weighted_error(W, tucker2_reconstruct(core, U_T, U_S), Sigma))
        if it == n_iter - 1 or errors[-2] - errors[-1] < tol * errors[-2]:
            break
        G = core.reshape(rT, rS, k)
        U_perp = torch.linalg.qr(U_S, mode="complete")[0][:, rS:]
        Z_hat = G.reshape(rT, rS * k) @ torch.einsum("sj,spuq->jpuq", U_S, Sig4).reshape(rS * k, d)
        g = U_perp.T @ torch.einsum("tjp,tsp->sj", G, (U_T.T @ WSig - Z_hat).reshape(rT, S, k))
        N = (G.reshape(rT, rS * k).T @ G.reshape(rT, rS * k)).reshape(rS, k, rS, k)
        H = torch.einsum("apbq,jplq->ajbl", torch.einsum("sa,spuq,ub->apbq", U_perp, Sig4, U_perp), N)
        X = torch.linalg.solve(H.reshape(n * rS, n * rS), g.reshape(-1)).reshape(n, rS)
        U_S = torch.linalg.qr(U_S + U_perp @ X)[0]
    return min(errors)


@pytest.fixture(scope="module")
def resnet20_statistics():
    """Real ResNet-20 weights and their Σ + 10⁻³ I (as `compress` uses it) from 256 CIFAR-10
    training images, for one or two convs of each stage."""
    model = lr.models.resnet20()
    names = ["layer1.0.conv1", "layer2.0.conv1", "layer2.2.conv2", "layer3.1.conv2"]
    stats = lr.calibrate(model, lr.data.cifar10("train"), layers=names, limit=256, progress=False)
    return {n: (model.get_submodule(n).weight.detach().double(), lr.decompose.weighted.ridged(stats[n].sigma))
            for n in names}


@pytest.mark.parametrize("n_iter", [3, 20])
def test_tucker2_never_worse_than_the_dense_solve_on_resnet20(resnet20_statistics, n_iter):
    # The conjugate-gradient U_S step must lose nothing against the exact dense solve it replaced
    # (which needs (S − rS)²·rS² numbers: 31 GB at 512 channels), at the book's n_iter=3 and at
    # the default 20, and never end above the HOSVD start.
    for name, (W, Sigma) in resnet20_statistics.items():
        T, S = W.shape[:2]
        for ranks in [(T // 2, S // 2), (T // 4, S // 4)]:
            core, U_T, U_S, history = weighted_tucker2(W, Sigma, ranks, n_iter=n_iter)
            error = weighted_error(W, tucker2_reconstruct(core, U_T, U_S), Sigma)
            assert error == pytest.approx(min(history), rel=1e-9)
            assert error <= dense_tucker2(W, Sigma, ranks, n_iter) + 1e-9, (name, ranks)
            assert error < history[0], (name, ranks)


# --- weighted_cp -------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["4way", "3way"])
def test_cp_descends_from_its_start(form):
    W = kernel(T=8, S=6, seed=7)
    Sigma = spd(54, seed=8, decay=6.0)
    init = conv_cp(W, 5, form)
    result = weighted_cp(W, Sigma, 5, form, n_iter=20, init=init)
    assert isinstance(result, CPResult)
    sizes = [8, 6, 3, 3] if form == "4way" else [8, 6, 9]
    assert [f.shape for f in result.factors] == [(n, 5) for n in sizes]
    assert nonincreasing(result.history)
    W_hat = result.reconstruct().reshape(W.shape)
    assert result.relative_error == pytest.approx(weighted_error(W, W_hat, Sigma), rel=1e-9)
    start = weighted_error(W, cp_reconstruct(init.weights, init.factors).reshape(W.shape), Sigma)
    assert result.history[0] == pytest.approx(start, rel=1e-9)
    assert result.relative_error < start - 1e-3
    for f in result.factors:
        assert torch.allclose(f.norm(dim=0), torch.ones(5, dtype=W.dtype))


def test_cp_identity_sigma_keeps_the_cp_als_fit():
    W = kernel(T=8, S=6, seed=9)
    init = conv_cp(W, 4)
    result = weighted_cp(W, torch.eye(54), 4, init=init, n_iter=10)
    assert nonincreasing(result.history)
    assert result.history[0] == pytest.approx(init.relative_error, rel=1e-6)
    assert result.relative_error <= init.relative_error + 1e-9


def test_cp_bad_input():
    W = kernel(T=8, S=6)
    with pytest.raises(ValueError, match="form"):
        weighted_cp(W, torch.eye(54), 3, form="5way")
    with pytest.raises(ValueError):
        weighted_cp(W, torch.eye(54), 0)
    with pytest.raises(ValueError, match="init"):
        weighted_cp(W, torch.eye(54), 3, form="3way", init=conv_cp(W, 3, "4way"))
    with pytest.raises(ValueError, match="d = 54"):
        weighted_cp(W, torch.eye(50), 3)


def test_cp_reports_a_vanished_component():
    # The de Silva–Lim tensor as a [2, 2, 2, 1] kernel (3-way: T, S, kh·kw), Σ = I: the start
    # collapses to rank 1 and the Σ-weighted ALS cannot revive the dead component either.
    e1, e2 = torch.eye(2, dtype=torch.float64)
    outer = lambda x, y, z: x[:, None, None] * y[None, :, None] * z[None, None, :]
    W = (outer(e1, e1, e2) + outer(e1, e2, e1) + outer(e2, e1, e1)).reshape(2, 2, 2, 1)
    with pytest.warns(CPDegeneracyWarning, match="vanished"):
        result = weighted_cp(W, torch.eye(4, dtype=torch.float64), 2, form="3way")
    assert float(result.weights.min()) < 1e-8


# --- real weights, real inputs -----------------------------------------------------------------

def test_first_resnet56_layer_with_real_image_patches():
    """Σ of the real 3×3 patches that ResNet-56's first conv sees on CIFAR-10 test images."""
    state = torch.load(lr.storage.data_root() / "checkpoints" / "resnet56-4bfd9763.th",
                       map_location="cpu", weights_only=True)["state_dict"]
    W = state["module.conv1.weight"].double()                        # [16, 3, 3, 3]
    images = np.load(lr.storage.data_root() / "cifar10-offline" / "test.npz")["images"][:200]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(lr.data.MEAN).view(1, 3, 1, 1)) / torch.tensor(lr.data.STD).view(1, 3, 1, 1)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)   # (s, i, j) order
    Sigma = patches.T @ patches / len(patches)
    # Σ-weighted rank 4 vs plain rank 4: the output error on the very patches behind Σ
    A, B = weighted_svd(channel_matrix(W), Sigma, 4)
    U, s, Vh = truncated_svd(channel_matrix(W), 4)
    plain = U @ torch.diag(s) @ Vh
    out = patches @ channel_matrix(W).T

    def output_error(W_hat):
        return float(torch.linalg.norm(out - patches @ W_hat.T) / torch.linalg.norm(out))

    assert output_error(A @ B) == pytest.approx(weighted_error(channel_matrix(W), A @ B, Sigma), rel=1e-6)
    assert output_error(A @ B) < 0.7 * output_error(plain)
