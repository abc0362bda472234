import math

import pytest
import torch

from lowrank import models
from lowrank.decompose.tucker import unfold
from lowrank.decompose.vbmf import evb_threshold, evbmf, free_energy


def low_rank_plus_noise(m, n, rank, sigma=1.0, snr=4.0, seed=0, dtype=torch.float64):
    """X + E: X of the given rank with singular values ``snr``–2·``snr`` times the noise edge
    σ(√m + √n), E Gaussian of variance σ². Returns ``(Y, X)``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=dtype))[0]
    B = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=dtype))[0]
    s = sigma * (math.sqrt(m) + math.sqrt(n)) * snr * torch.linspace(1, 2, rank, dtype=dtype)
    X = (A * s) @ B.T
    return X + sigma * torch.randn(m, n, generator=g, dtype=dtype), X


def iterative_vb(gamma, L, M, sigma2, sweeps=20000):
    """Plain coordinate-descent EVB on one singular component γ of an L×M matrix, from a large start.

    Factors a ~ N(â, σ_a² I_M), b ~ N(b̂, σ_b² I_L), priors N(0, c_a² I), N(0, c_b² I) learned.
    Returns the posterior mean â b̂ and the free energy 2F of the component relative to dropping it.
    """
    a = b = math.sqrt(gamma)
    ca2 = cb2 = gamma
    sb2 = 1.0
    for _ in range(sweeps):
        sa2 = sigma2 / (b * b + L * sb2 + sigma2 / ca2)
        a = gamma * b * sa2 / sigma2
        sb2 = sigma2 / (a * a + M * sa2 + sigma2 / cb2)
        b = gamma * a * sb2 / sigma2
        ca2, cb2 = (a * a + M * sa2) / M, (b * b + L * sb2) / L
    F2 = (M * math.log(ca2 / sa2) + L * math.log(cb2 / sb2) + (a * a + M * sa2) / ca2
          + (b * b + L * sb2) / cb2 - (L + M) + (-2 * gamma * a * b + (a * a + M * sa2) * (b * b + L * sb2)) / sigma2)
    return a * b, F2


def test_threshold_for_square_matrices():
    tau_bar = 2.5128624  # the zero of 2 (log(1 + τ)/τ − 1/2) for α = 1
    assert evb_threshold(1.0) == pytest.approx((1 + tau_bar) ** 2 / tau_bar, rel=1e-7)


@pytest.mark.parametrize("L, M", [(10, 10), (5, 40), (20, 30)])
def test_closed_form_matches_iterative_vb_on_one_component(L, M):
    """Rank-one Y = γ u vᵀ with σ² known: the analytic solution is the best stationary point of
    the VB free energy; the component is kept exactly where that free energy drops below 0."""
    sigma2 = 1.0
    x_bar = evb_threshold(L / M)
    u = torch.zeros(L, dtype=torch.float64)
    v = torch.zeros(M, dtype=torch.float64)
    u[0] = v[0] = 1
    for ratio in (0.995, 1.005, 1.5, 4.0):
        gamma = math.sqrt(ratio * x_bar * M * sigma2)
        ab, F2 = iterative_vb(gamma, L, M, sigma2)
        assert (F2 < 0) == (ratio > 1)
        result = evbmf(gamma * torch.outer(u, v), sigma2=sigma2)
        assert result.rank == (1 if ratio > 1 else 0)
        if ratio > 1:
            assert float(result.s[0]) == pytest.approx(ab, rel=1e-6)
            # the free energy of keeping it, as used to estimate σ²: ψ₁ = 2F/M
            kept_minus_dropped = free_energy(torch.tensor([sigma2], dtype=torch.float64),
                                             torch.tensor([gamma] + [0.0] * (L - 1), dtype=torch.float64), M)
            dropped = gamma**2 / M
            assert float(kept_minus_dropped) - dropped == pytest.approx(F2 / M, rel=1e-6, abs=1e-9)


SHAPES = [(50, 80, 5), (80, 50, 5), (30, 300, 3), (300, 30, 3), (100, 100, 10), (64, 576, 8), (16, 144, 2),
          (40, 60, 0), (60, 40, 0)]


@pytest.mark.parametrize("m, n, rank", SHAPES)
def test_recovers_the_rank(m, n, rank):
    Y, X = low_rank_plus_noise(m, n, rank, sigma=0.3)
    estimated = evbmf(Y)
    known = evbmf(Y, sigma2=0.09)
    assert estimated.rank == known.rank == rank
    assert estimated.sigma2 == pytest.approx(0.09, rel=0.1)
    assert known.sigma2 == 0.09
    assert estimated.s.shape == (rank,) and estimated.U.shape == (m, rank) and estimated.V.shape == (n, rank)
    if rank:
        # shrunk singular values, and a better estimate of X than Y itself
        assert (estimated.s < torch.linalg.svdvals(Y)[:rank]).all()
        assert torch.linalg.norm(estimated.estimate() - X) < 0.5 * torch.linalg.norm(Y - X)


@pytest.mark.parametrize("m, n, rank", [(50, 80, 5), (30, 300, 3), (40, 60, 0)])
def test_both_orientations_agree(m, n, rank):
    Y, _ = low_rank_plus_noise(m, n, rank, seed=3)
    a, b = evbmf(Y), evbmf(Y.T)
    assert a.rank == b.rank == rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6)  # the log-grid resolution of the search
    assert torch.allclose(a.estimate(), b.estimate().T, atol=1e-6)


@pytest.mark.parametrize("m, n, rank, snr", [(50, 80, 5, 4.0), (80, 50, 3, 1.0), (20, 200, 2, 0.8), (40, 40, 0, 1.0)])
def test_noise_variance_is_the_global_minimum(m, n, rank, snr):
    """The bounded search finds the free-energy minimum of a brute-force scan over 10 decades."""
    Y, _ = low_rank_plus_noise(m, n, rank, snr=snr, seed=4)
    gamma = torch.linalg.svdvals(Y)
    M = max(m, n)
    scale = float(gamma.square().sum()) / (m * n)
    grid = torch.logspace(-6, 4, 20001, dtype=torch.float64) * scale
    ours = free_energy(torch.tensor([evbmf(Y).sigma2], dtype=torch.float64), gamma, M)
    assert float(ours) <= float(free_energy(grid, gamma, M).min()) + 1e-9


def test_recovers_rank_in_float32():
    Y, _ = low_rank_plus_noise(64, 144, 6, seed=5, dtype=torch.float32)
    result = evbmf(Y)
    assert result.rank == 6 and result.s.dtype == torch.float32


def test_zero_matrix_has_rank_zero():
    result = evbmf(torch.zeros(5, 7))
    assert result.rank == 0 and result.sigma2 == 0.0 and result.estimate().shape == (5, 7)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="2-D"):
        evbmf(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="non-empty"):
        evbmf(torch.randn(0, 4))
    Y = torch.randn(6, 9)
    Y[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        evbmf(Y)
    for sigma2 in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma2"):
            evbmf(torch.randn(6, 9), sigma2=sigma2)


def test_ranks_of_resnet56_unfoldings():
    """EVBMF on the mode-0 [T, S·9] and mode-1 [S, T·9] unfoldings of real ResNet-56 3×3 kernels."""
    model = models.resnet56(pretrained=True)
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3):
            W = conv.weight.detach()
            ranks = [evbmf(unfold(W, mode)).rank for mode in (0, 1)]
            print(f"{name:16s} {tuple(W.shape)} EVBMF ranks (T, S): {ranks}")
            assert 0 <= ranks[0] <= W.shape[0] and 0 <= ranks[1] <= W.shape[1]
