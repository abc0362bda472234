"""Empirical variational Bayesian matrix factorization (EVBMF): a rank chosen by the data alone.

Written from S. Nakajima, M. Sugiyama, S. D. Babacan and R. Tomioka, "Global analytic solution
of fully-observed variational Bayesian matrix factorization", JMLR 14 (2013) 1–37.

Model: V = B Aᵀ + E for V [L, M] with L ≤ M (a matrix with more rows than columns is read
transposed; its singular values are the same), Gaussian noise E of variance σ², Gaussian priors
on the columns of A and B whose variances are learned too ("empirical" Bayes). Notation:
α = L / M, γ_h the singular values of V, x_h = γ_h² / (M σ²).

The global solution keeps the singular vectors of V and shrinks or drops each singular value:
- component h is kept iff x_h > x̲ = (1 + τ̲)(1 + α/τ̲), where τ̲ > 0 is the zero of
  Φ(τ) + Φ(τ/α) with Φ(z) = log(1 + z)/z − 1/2 (τ̲ = 2.5129 for α = 1; it is solved here
  rather than approximated by 2.5129 √α);
- a kept component shrinks to
  γ̆_h = (γ_h/2) (1 − (L+M)σ²/γ_h² + sqrt((1 − (L+M)σ²/γ_h²)² − 4 L M σ⁴/γ_h⁴)) = γ_h τ(x_h)/x_h,
  with τ(x) = (x − (1+α) + sqrt((x − (1+α))² − 4α)) / 2;
- its free energy, relative to dropping it, is M ψ₁(x_h) with
  ψ₁(x) = log(τ + 1) + α log(τ/α + 1) − τ  (negative exactly when x > x̲).
With σ² unknown, σ² minimises the free energy, up to constants
  2F / M = ‖V‖² / (M σ²) + L log σ² + Σ_{h: x_h > x̲} ψ₁(x_h),
searched on [σ̲², σ̄²]: σ̄² = ‖V‖²/(L M) (the rank-0 estimate); σ̲² = max(γ²_{H̄+1} / (M x̲),
Σ_{h>H̄} γ_h² / (M (L − H̄))) with H̄ = ⌈L/(1+α)⌉ − 1 the largest rank EVB can return.
tests/test_vbmf.py checks these closed forms against plain iterative VB on one component.
"""
import math
from dataclasses import dataclass

import torch

from .svd import check_weight


@dataclass
class VBMFResult:
    """EVBMF of Y [m, n]: Ŷ = U diag(s) Vᵀ with U [m, rank], s [rank] (shrunk), V [n, rank]."""

    rank: int
    sigma2: float
    s: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor

    def estimate(self) -> torch.Tensor:
        """The posterior mean Ŷ = U diag(s) Vᵀ, shape [m, n]."""
        return (self.U * self.s) @ self.V.T


def evb_threshold(alpha: float) -> float:
    """x̲ = (1 + τ̲)(1 + α/τ̲), τ̲ the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(1 + z)/z − 1/2; 0 < α ≤ 1."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha = L/M must be in (0, 1], got {alpha}")

    def phi(z):
        return math.log1p(z) / z - 0.5

    low, high = 1e-12, 1e12  # Φ(τ) + Φ(τ/α) decreases from 1 to −1: bisection on a log scale
    for _ in range(200):
        tau_bar = math.sqrt(low * high)
        if phi(tau_bar) + phi(tau_bar / alpha) > 0:
            low = tau_bar
        else:
            high = tau_bar
    return (1 + tau_bar) * (1 + alpha / tau_bar)


def tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ(x) = (x − (1+α) + sqrt((x − (1+α))² − 4α)) / 2, the inverse of x = (1 + τ)(1 + α/τ)."""
    d = x - (1 + alpha)
    return (d + (d.square() - 4 * alpha).clamp(min=0).sqrt()) / 2


def free_energy(sigma2: torch.Tensor, gamma: torch.Tensor, M: int) -> torch.Tensor:
    """2F/M up to a constant for each noise variance in ``sigma2`` [k]; ``gamma`` [L]: singular values."""
    L = gamma.numel()
    alpha = L / M
    x_bar = evb_threshold(alpha)
    x = gamma.square() / (M * sigma2[:, None])  # [k, L]
    t = tau(x.clamp(min=x_bar), alpha)
    psi1 = torch.log(t + 1) + alpha * torch.log(t / alpha + 1) - t
    return gamma.square().sum() / (M * sigma2) + L * sigma2.log() + torch.where(x > x_bar, psi1, 0).sum(-1)


def estimate_sigma2(gamma: torch.Tensor, M: int, n: int = 256, rounds: int = 4) -> float:
    """σ² minimising :func:`free_energy` on [σ̲², σ̄²] (module docstring), by refined log grids."""
    L = gamma.numel()
    alpha = L / M
    x_bar = evb_threshold(alpha)
    g2 = gamma.double().square()
    upper = float(g2.sum()) / (L * M)
    if upper == 0:
        return 0.0
    H_bar = math.ceil(L / (1 + alpha)) - 1
    lower = max(float(g2[H_bar]) / (M * x_bar), float(g2[H_bar:].mean()) / M, upper * 1e-10)
    if lower >= upper:
        return upper
    low, high = math.log(lower), math.log(upper)
    for _ in range(rounds):
        grid = torch.linspace(low, high, n, dtype=torch.float64, device=gamma.device)
        i = int(free_energy(grid.exp(), g2.sqrt(), M).argmin())
        step = (high - low) / (n - 1)
        low, high = max(low, float(grid[i]) - step), min(high, float(grid[i]) + step)
    grid = torch.tensor([low, (low + high) / 2, high], dtype=torch.float64, device=gamma.device).exp()
    return float(grid[free_energy(grid, g2.sqrt(), M).argmin()])


def evbmf(Y: torch.Tensor, sigma2: float | None = None) -> VBMFResult:
    """Empirical VB matrix factorization of ``Y`` [m, n] (Nakajima et al., JMLR 2013).

    ``sigma2``: the noise variance if known; ``None`` estimates it by minimising the free energy.
    Returns a :class:`VBMFResult`: the rank (0 for pure noise), σ², the shrunk singular values kept
    [rank] and their singular vectors U [m, rank], V [n, rank].
    """
    check_weight(Y, 2)
    if Y.numel() == 0:
        raise ValueError(f"expected a non-empty matrix, got shape {tuple(Y.shape)}")
    if sigma2 is not None and not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    L, M = sorted(Y.shape)  # the paper's orientation V [L, M], L ≤ M: same singular values
    U, gamma, Vh = torch.linalg.svd(Y, full_matrices=False)
    if sigma2 is None:
        sigma2 = estimate_sigma2(gamma, M)
    if sigma2 == 0:  # Y = 0
        rank = 0
    else:
        threshold = math.sqrt(M * sigma2 * evb_threshold(L / M))
        rank = int((gamma > threshold).sum())
    g = gamma[:rank].double()
    q = 1 - (L + M) * sigma2 / g.square()
    s = g / 2 * (q + (q.square() - 4 * L * M * sigma2**2 / g**4).clamp(min=0).sqrt())
    return VBMFResult(rank, float(sigma2), s.to(Y.dtype), U[:, :rank], Vh[:rank].T)
