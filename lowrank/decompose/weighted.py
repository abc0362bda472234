r"""Data-informed decompositions: minimise the change of a layer's output, not of its weights.

A layer multiplies input vectors x [d] by W [T, d] (a linear layer, or a conv seen as
``W.reshape(T, -1)`` acting on im2col patches, entries ordered (s, i, j)). Replacing W by W̃
changes the outputs on inputs with second moment (or covariance) Σ = E[x xᵀ] [d, d] by

    E‖(W − W̃) x‖² = trace((W − W̃) Σ (W − W̃)ᵀ) = ‖(W − W̃) Σ^{1/2}‖_F²,

the Σ-norm of Kalle et al. (NeurIPS 2025). Every algorithm here minimises it.

**Whitening.** With Σ = Q Λ Qᵀ, eigenvalues floored at ``rel_floor`` · λ_max (so that a
singular Σ, e.g. from dead ReLU channels, still works), L = Q Λ^{1/2} gives Σ ≈ L Lᵀ and
‖E Σ^{1/2}‖_F = ‖E L‖_F; L⁻¹ = Λ^{-1/2} Qᵀ needs no inverse. The floor acts as a tiny ridge: in
directions the data never visit, the solution stays close to W instead of being arbitrary.
:func:`weighted_svd` minimises the norm of the floored Σ and reports errors in it.

**Ridge** (:func:`ridged`). The layer functions below minimise the Σ-norm of the Σ they are
given. :func:`lowrank.compress` and :func:`lowrank.compress_sequential` pass them Σ + δ I, which
minimises ‖(W − W̃) Σ^{1/2}‖_F² + δ ‖W − W̃‖_F²: in directions the calibration inputs (almost)
never take, the factors stay close to W. Without it the Σ-optimum is not unique where Σ is
(nearly) singular, and an algorithm may pick factors much larger than W (the fit spends weight on
directions of tiny variance), harmless on the calibration data but bad for a later fine-tuning:
a dense solve of the U_S step did (ResNet-20 layer2.1.conv1 at 50 %: core norm 21.0, ‖W‖ = 10.4);
the conjugate gradients below, which start at zero and stay in the range of their matrix, did
not (9.4). The ridge makes the optimum unique either way.

**Matrix case** (:func:`weighted_svd`). ‖(W − W̃) L‖ over rank-r W̃ is the Eckart–Young problem
for W L, so W̃ = [W L]_r L⁻¹. Writing [W L]_r = U_r U_rᵀ W L gives W̃ = U_r U_rᵀ W: keep the
leading r left singular vectors U_r of W L and project W onto them (no L⁻¹ at all).

**Tucker-2** (:func:`weighted_tucker2`). W̃ = G ×₁ U_T ×₂ U_S. As a [T, d] matrix
W̃ = U_T C Kᵀ with C = G_(T) [rT, rS·k] (k = kh·kw) and K = U_S ⊗ I_k [d, rS·k].

* (U_T, G) given U_S, jointly and in closed form. For any C of rank ≤ rT,
  ‖(W − C Kᵀ) L‖² = ‖(W − C₀ Kᵀ) L‖² + ‖(C₀ − C) R‖² with Σ_K = Kᵀ Σ K = R Rᵀ (Cholesky) and
  C₀ = W Σ K Σ_K⁻¹ the weighted least-squares fit. So U_T = leading rT left singular vectors
  of C₀ R = W Σ K R⁻ᵀ (a triangular solve) and G_(T) = U_Tᵀ C₀. This is the classic
  U_T = W Σ M (Mᵀ Σ M)⁻¹ step and the core's weighted least squares done at once.
* U_S given (U_T, G). With U_T orthonormal, the error is ‖(1 − U_T U_Tᵀ) W L‖² plus
  Σ_t ‖(z_t − vec(U_S G_t)) L‖², where z_t are the rows of Z = U_Tᵀ W and G_t = G[t] [rS, k]
  (vectors flattened row-major, s then p). This is a convex quadratic in U_S: the step
  U_S ← U_S + X [S, rS] minimises ⟨X, H(X)⟩ − 2⟨g, X⟩ with

      H(X)[s,j] = Σ_{p,u,q,l} Σ[(s,p),(u,q)] X[u,l] N[(j,p),(l,q)],   N = G_(T)ᵀ G_(T),
      g = Σ_t ((Z − Ẑ) Σ)_t G_tᵀ [S, rS]   (the residual's gradient, Ẑ = G ×₂ U_S),

  S·rS unknowns (131,072 for a 512-channel layer at half rank: too many for the dense normal
  equations, 137 GB). Σ couples input channels with kernel positions, so there is no SVD
  shortcut; instead :data:`CG_STEPS` steps of conjugate gradients, matrix-free: H(X) costs one
  product (X ⊗ I_k)ᵀ Σ [rS·k, d] and one with N. Preconditioner: Σ ≈ A ⊗ P, its nearest
  Kronecker product (Van Loan & Pitsianis 1993; A [S, S], P [k, k]), makes H ≈ X ↦ A X Bᵀ with
  B = Σ_{p,q} P[p,q] N[(·,p),(·,q)] [rS, rS], inverted by two Cholesky solves. Every CG step
  lowers the quadratic, so the error never increases however few steps are taken. U_S is then
  orthonormalised by QR (the next step absorbs the triangle into G), and Kᵀ Σ is updated from
  the CG products instead of being recomputed. Memory: Σ, a reordered copy, and a few
  [rS·k, d] arrays; no S·rS × S·rS matrix.

Each step minimises the error over its block (the U_S step up to the CG truncation), so the error
never increases. When Σ = I the first step is HOOI's U_T update and the second a least-squares
move of U_S towards the same optimum (HOOI instead takes an SVD, which needs a Kronecker Σ).
For rS = S (U_S = I) the first step is already the global optimum. So is the weighted SVD for a
1×1 kernel (k = 1): then U_T G U_Sᵀ is any matrix of rank ≤ min(rT, rS).

The errors Tucker-2 and CP report are those of the Σ given (a :class:`Whitening`'s floored Σ);
they need only products with Σ, never its eigendecomposition (9 d³ operations: minutes for a
512-channel 3×3 layer on a CPU).

**CP** (:func:`weighted_cp`). W̃ = A Mᵀ with A [T, R] (the output factor, weights included)
and M = B ⊙ C ⊙ D [d, R] the Khatri–Rao product of the input factors (rows (s, i, j);
3-way: M = B ⊙ P with P [kh·kw, R]).

* A in closed form: ∂/∂A = 0 gives A (Mᵀ Σ M) = W Σ M, an R × R system.
* An input factor X [I_n, R] (one of B, C, D): column q enters M linearly, m_q = J_q x_q with
  J_q [d, I_n] the Kronecker product of the other factors' q-th columns and an identity in
  place n (e.g. J_q = I_S ⊗ c_q ⊗ d_q for B). The normal equations

      Σ_r (a_qᵀ a_r) J_qᵀ Σ J_r x_r = J_qᵀ Σ Wᵀ a_q        for every q

  couple all components through Σ. With Σ = I, J_qᵀ J_r = (c_qᵀ c_r)(d_qᵀ d_r) I and this is
  the usual CP-ALS step with its R × R Hadamard product of Grams. In general the system has
  I_n·R unknowns (8,768 for S = 64, R = 137: too many for a dense solve), so we take one
  Gauss–Seidel sweep over the components instead: with the residual E = W − A Mᵀ,

      x_q ← x_q + (‖a_q‖² J_qᵀ Σ J_q)⁻¹ J_qᵀ Σ Eᵀ a_q,

  an I_n × I_n solve that exactly minimises the error over x_q, after which E is updated. The
  R small matrices J_qᵀ Σ J_q depend only on the other factors, so they are built in one batch.

A sweep updates A, then each input factor; columns of the input factors are then normalised
into A. Every update is an exact block minimisation, so the error never increases.

All linear solves carry a proximal term δ‖Δ‖² (δ = 1e-10 × the mean diagonal), which keeps
them well-posed when a block is singular and still guarantees a decrease. The ALS routines
stop when the relative Σ-error improves by less than ``tol`` and return the best iterate.
Computation is in float64 on W's device; results come back in W's dtype.
"""
import math
import warnings
from dataclasses import dataclass, replace

import torch

from .cp import CPDegeneracyWarning, CPResult, check_vanished, conv_cp
from .svd import check_rank, check_weight
from .tucker import hosvd, left_singular_vectors, mode_product

# Conjugate-gradient steps per U_S update of the Σ-weighted Tucker-2 (each one product of Σ
# with a [d, rS] matrix); benchmarks/results/tucker2_scaling.md measures the choice.
CG_STEPS = 8


@dataclass
class Whitening:
    """Σ [d, d] ≈ L Lᵀ with L = Q Λ^{1/2}, eigenvalues floored at ``rel_floor`` · λ_max.

    ``L`` [d, d]; ``eigenvectors`` Q [d, d]; ``eigenvalues`` [d] of Σ as given (descending);
    ``floored`` [d] the eigenvalues used (≥ ``floor``); ``condition`` λ_max / λ_min after the
    floor (at most 1 / rel_floor); ``raw_condition`` the same before it (inf if Σ is singular);
    ``effective_rank`` exp of the entropy of λ / Σλ (Roy & Vetterli 2007): d for Σ = I, 1 for a
    rank-one Σ, in between for a decaying spectrum. All tensors float64 on Σ's device; the
    decompositions move them to the weight's device.
    """

    L: torch.Tensor
    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    floored: torch.Tensor
    floor: float
    condition: float
    raw_condition: float
    effective_rank: float

    @property
    def sigma(self) -> torch.Tensor:
        """The floored Σ = L Lᵀ [d, d] that the algorithms minimise with."""
        return (self.eigenvectors * self.floored) @ self.eigenvectors.T

    @property
    def numerical_rank(self) -> int:
        """Number of eigenvalues of Σ above the floor."""
        return int((self.eigenvalues > self.floor).sum())

    def whiten(self, X: torch.Tensor) -> torch.Tensor:
        """``X L`` for X [..., d] (so ‖X L‖_F² = trace(X Σ Xᵀ))."""
        return X.to(self.L.dtype) @ self.L

    def unwhiten(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y L⁻¹ = (Y Λ^{-1/2}) Qᵀ`` for Y [..., d]: the inverse of :meth:`whiten`."""
        return (Y.to(self.L.dtype) * self.floored.rsqrt()) @ self.eigenvectors.T


def _round_off(dtype) -> float:
    """Relative size of round-off tolerated in Σ (asymmetry, negative eigenvalues): sqrt(eps)."""
    return torch.finfo(dtype).eps ** 0.5


def _check_sigma(Sigma: torch.Tensor, d=None) -> torch.Tensor:
    """Σ as a symmetric float64 [d, d] tensor; ``ValueError`` if not square, finite and symmetric."""
    if not isinstance(Sigma, torch.Tensor) or Sigma.dim() != 2 or Sigma.shape[0] != Sigma.shape[1]:
        shape = tuple(Sigma.shape) if isinstance(Sigma, torch.Tensor) else type(Sigma).__name__
        raise ValueError(f"Σ must be a square [d, d] matrix, got {shape}")
    if d is not None and Sigma.shape[0] != d:
        raise ValueError(f"Σ is {tuple(Sigma.shape)} but the weight has d = {d} inputs per output")
    if not Sigma.is_floating_point():
        raise ValueError(f"Σ must be floating point, got {Sigma.dtype}")
    S64 = Sigma.to(torch.float64)
    scale = torch.linalg.vector_norm(S64, math.inf)           # max |Σ|, NaN if Σ holds a NaN
    if not torch.isfinite(scale):
        raise ValueError("Σ holds NaN or infinite entries")
    if scale == 0:
        raise ValueError("Σ is zero: the layer never sees a non-zero input")
    asymmetry = torch.linalg.vector_norm(S64 - S64.T, math.inf)
    if asymmetry > _round_off(Sigma.dtype) * scale:
        raise ValueError("Σ is not symmetric")
    return S64 if asymmetry == 0 else (S64 + S64.T) / 2


def whitening(Sigma: torch.Tensor, rel_floor: float = 1e-10) -> Whitening:
    """Eigendecomposition of Σ [d, d] with eigenvalues floored at ``rel_floor`` · λ_max.

    Raises ``ValueError`` if Σ is not a finite symmetric square matrix, is zero, or has a
    negative eigenvalue beyond round-off (below −sqrt(eps)·λ_max for Σ's dtype; asymmetry is
    tolerated up to sqrt(eps)·max|Σ|, then Σ is symmetrised).
    A singular Σ is fine. Returns a :class:`Whitening`.
    """
    if not 0 < rel_floor < 1:
        raise ValueError(f"rel_floor must be in (0, 1), got {rel_floor!r}")
    d = Sigma.shape[0] if isinstance(Sigma, torch.Tensor) and Sigma.dim() == 2 else None
    S64 = _check_sigma(Sigma, d)
    lam, Q = torch.linalg.eigh(S64)
    lam, Q = lam.flip(0), Q.flip(1)  # descending
    lam_max = float(lam[0])
    if lam_max <= 0 or float(lam[-1]) < -_round_off(Sigma.dtype) * lam_max:
        raise ValueError(f"Σ is not positive semi-definite: eigenvalues from {float(lam[-1]):.3g} "
                         f"to {lam_max:.3g}")
    floor = rel_floor * lam_max
    floored = lam.clamp(min=floor)
    p = lam.clamp(min=0) / lam.clamp(min=0).sum()
    entropy = -(p * p.clamp(min=torch.finfo(torch.float64).tiny).log()).sum()
    raw_condition = lam_max / float(lam[-1]) if lam[-1] > 0 else math.inf
    return Whitening(L=Q * floored.sqrt(), eigenvectors=Q, eigenvalues=lam, floored=floored,
                     floor=floor, condition=lam_max / float(floored[-1]),
                     raw_condition=raw_condition, effective_rank=float(entropy.exp()))


def _as_whitening(Sigma, rel_floor: float, d: int, device) -> Whitening:
    """A :class:`Whitening` of Σ on ``device`` (computed here if a tensor is given), checked [d, d]."""
    if isinstance(Sigma, Whitening):
        if Sigma.L.shape[0] != d:
            raise ValueError(f"Σ is {tuple(Sigma.L.shape)} but the weight has d = {d} inputs per output")
        return replace(Sigma, **{f: getattr(Sigma, f).to(device)
                                 for f in ("L", "eigenvectors", "eigenvalues", "floored")})
    if isinstance(Sigma, torch.Tensor) and Sigma.dim() == 2 and Sigma.shape[0] != d:
        raise ValueError(f"Σ is {tuple(Sigma.shape)} but the weight has d = {d} inputs per output")
    return whitening(Sigma.to(device) if isinstance(Sigma, torch.Tensor) else Sigma, rel_floor)


def khatri_rao(factors) -> torch.Tensor:
    """Column-wise Kronecker product of [I_k, R] matrices → [Π I_k, R], the first index slowest."""
    K = factors[0]
    for F in factors[1:]:
        K = (K[:, None, :] * F[None, :, :]).reshape(-1, K.shape[1])
    return K


def _to64(W: torch.Tensor) -> torch.Tensor:
    """W detached (a layer's weight may be passed as it is), in float64."""
    return W.detach().to(torch.float64)


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, Sigma: torch.Tensor) -> float:
    """Relative Σ-error ``‖(W − Ŵ) Σ^{1/2}‖_F / ‖W Σ^{1/2}‖_F`` as a float.

    W, Ŵ of the same shape [T, ...], flattened to [T, d]; Σ [d, d] (the matrix as given, not
    floored). Raises ``ValueError`` on mismatched shapes, non-finite input, or W Σ Wᵀ = 0.
    """
    if W.shape != W_hat.shape or W.dim() < 2:
        raise ValueError(f"W and Ŵ must have the same shape [T, ...], got {tuple(W.shape)} and "
                         f"{tuple(W_hat.shape)}")
    check_weight(W, W.dim())
    check_weight(W_hat, W_hat.dim())
    T = W.shape[0]
    W2, E = _to64(W).reshape(T, -1), _to64(W - W_hat).reshape(T, -1)
    Sigma = _check_sigma(Sigma, W2.shape[1]).to(W2.device)
    total = ((W2 @ Sigma) * W2).sum()
    if total <= 0:
        raise ValueError("W Σ Wᵀ = 0: W only meets inputs that Σ says never occur")
    return float(((E @ Sigma) * E).sum().clamp(min=0).div(total).sqrt())


def _error(E: torch.Tensor, Sigma: torch.Tensor, total: torch.Tensor) -> float:
    """Relative error sqrt(trace(E Σ Eᵀ) / total) for E [T, d] float64."""
    return float(((E @ Sigma) * E).sum().clamp(min=0).div(total).sqrt())


def _prox_cholesky(H: torch.Tensor, rel: float = 1e-10) -> torch.Tensor:
    """Cholesky factor of H + δ I, δ = ``rel`` × the mean diagonal of H (per batch entry).

    H [..., n, n] symmetric PSD. With it, Δ = (H + δ I)⁻¹ g minimises ½ΔᵀHΔ − gᵀΔ + ½δ‖Δ‖²: for a
    quadratic with Hessian H and negative gradient g at the current point, a step that never
    increases it, even where H is singular.
    """
    tiny = torch.finfo(H.dtype).tiny
    H = H.clone()
    diagonal = H.diagonal(dim1=-2, dim2=-1)
    diagonal += rel * diagonal.mean(-1, keepdim=True).clamp(min=tiny) + tiny
    return torch.linalg.cholesky(H)


def _prox_step(H: torch.Tensor, g: torch.Tensor, rel: float = 1e-10) -> torch.Tensor:
    """Δ = (H + δ I)⁻¹ g for H [n, n], g [n, m] (see :func:`_prox_cholesky`)."""
    return torch.cholesky_solve(g, _prox_cholesky(H, rel))


def weighted_svd(W: torch.Tensor, Sigma, rank: int, rel_floor: float = 1e-10):
    """Best rank-``rank`` W̃ = A B of W [T, d] in the Σ-norm: W̃ = [W L]_r L⁻¹ = U_r U_rᵀ W.

    Σ [d, d] (or a :class:`Whitening` of it, to reuse across ranks). Returns
    ``(A [T, r], B [r, d])`` with A = U_r orthonormal (leading left singular vectors of W L) and
    B = U_rᵀ W. For a conv, pass ``channel_matrix(W)``; B reshapes to a [r, S, kh, kw] kernel.
    """
    check_weight(W, 2)
    rank = check_rank(rank, min(W.shape))
    wh = _as_whitening(Sigma, rel_floor, W.shape[1], W.device)
    W64 = _to64(W)
    U = torch.linalg.svd(wh.whiten(W64), full_matrices=False)[0][:, :rank]
    return U.to(W.dtype), (U.T @ W64).to(W.dtype)


def ridged(Sigma: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Σ + δ I [d, d] float64 with δ = ``ridge`` × the mean diagonal of Σ (module docstring).

    Raises ``ValueError`` for ``ridge < 0`` or a Σ that :func:`whitening` would refuse to take.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    S64 = _check_sigma(Sigma)
    return S64 + ridge * S64.diagonal().mean() * torch.eye(len(S64), dtype=S64.dtype, device=S64.device)


def corrected_target(W: torch.Tensor, Sigma_hat: torch.Tensor, C: torch.Tensor, ridge: float = 1e-3):
    r"""Turn "reproduce W x from a perturbed input x̂" into a Σ-weighted problem.

    W [T, d]; ``Sigma_hat`` = E[x̂ x̂ᵀ] and ``C`` = E[x x̂ᵀ] [d, d], from pairs of the input x a
    layer had in the original network and the input x̂ it gets in the compressed one. For any W̃,

        E‖W x − W̃ x̂‖² + δ‖W − W̃‖_F² = const + ‖(W_eff − W̃) Σ_δ^{1/2}‖_F²

    with Σ_δ = Σ̂ + δ I, W_eff = (W C + δ W) Σ_δ⁻¹ and δ = ``ridge`` × the mean diagonal of Σ̂
    (expand both sides: the terms in W̃ agree). So the best W̃ of any form is the Σ_δ-weighted
    decomposition of W_eff. W_eff is the least-squares map from x̂ to W x: it corrects for the
    error of the layers before; the ridge keeps it at W in directions x̂ never takes (Σ_δ is
    :func:`ridged` Σ̂). With x̂ = x it is W itself.

    Returns ``(W_eff [T, d] in W's dtype, Σ_δ [d, d] float64)``. Raises ``ValueError`` on
    mismatched shapes, non-finite input, a zero or asymmetric Σ̂, or ``ridge <= 0``.
    """
    check_weight(W, 2)
    d = W.shape[1]
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge!r}")
    Sigma_hat = _check_sigma(Sigma_hat, d).to(W.device)
    if not (isinstance(C, torch.Tensor) and C.shape == (d, d) and torch.isfinite(C).all()):
        raise ValueError(f"C must be a finite [{d}, {d}] matrix")
    Sigma_delta = ridged(Sigma_hat, ridge)
    W64 = _to64(W)
    rhs = W64 @ (C.to(W64) + Sigma_delta - Sigma_hat)                     # W C + δ W  [T, d]
    W_eff = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(Sigma_delta)).T  # Σ_δ symmetric
    return W_eff.to(W.dtype), Sigma_delta


def _check_loop(n_iter, tol):
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")


def _sigma(Sigma, d: int, device) -> torch.Tensor:
    """Σ as a checked symmetric float64 [d, d] tensor on ``device``; a :class:`Whitening`'s floored Σ."""
    if isinstance(Sigma, Whitening):
        if Sigma.L.shape[0] != d:
            raise ValueError(f"Σ is {tuple(Sigma.L.shape)} but the weight has d = {d} inputs per output")
        return Sigma.sigma.to(device)
    return _check_sigma(Sigma.to(device) if isinstance(Sigma, torch.Tensor) else Sigma, d)


def _cholesky(H: torch.Tensor, rel: float, tolerance: float):
    """``(R, δ)`` with R Rᵀ = H + δ I for H [n, n] symmetric PSD: δ = 0 unless H is numerically
    singular, then δ = ``rel`` × its mean diagonal (:func:`_prox_cholesky`). ``ValueError`` if H
    has an eigenvalue below −``tolerance`` · λ_max (then Σ is not positive semi-definite)."""
    R, info = torch.linalg.cholesky_ex(H)
    if not info:
        return R, 0.0
    lam = torch.linalg.eigvalsh(H)
    if not lam[0] >= -tolerance * lam[-1].clamp(min=0):
        raise ValueError(f"Σ is not positive semi-definite: Kᵀ Σ K has eigenvalues from "
                         f"{float(lam[0]):.3g} to {float(lam[-1]):.3g}")
    delta = rel * float(H.diagonal().mean().clamp(min=0)) - float(lam[0].clamp(max=0)) + torch.finfo(H.dtype).tiny
    return torch.linalg.cholesky(H + delta * torch.eye(len(H), dtype=H.dtype, device=H.device)), delta


def _nearest_kronecker(blocks, sweeps: int = 2):
    """``(A [S, S], P [k, k])`` with Σ[(s,p),(u,q)] ≈ A[s,u] P[p,q] (Van Loan–Pitsianis, by
    alternating least squares from P = I), from ``blocks`` [S, k, k, S] = Σ[(u,q),(s,p)] at
    [u, q, p, s] (one S × S block per pair of kernel positions): the preconditioner of the
    U_S step."""
    k = blocks.shape[1]
    P = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    for _ in range(sweeps):
        A = sum(P[p, q] * blocks[:, q, p] for p in range(k) for q in range(k)) / P.square().sum()
        P = torch.stack([torch.stack([(blocks[:, q, p] * A).sum() for q in range(k)])
                         for p in range(k)]) / A.square().sum()
    return A, P


def weighted_tucker2(W: torch.Tensor, Sigma, ranks, n_iter: int = 20, tol: float = 1e-6,
                     rel_floor: float = 1e-10):
    """Tucker-2 of W [T, S, kh, kw] minimising ‖(W − G ×₁ U_T ×₂ U_S) Σ^{1/2}‖_F by ALS.

    Σ [S·kh·kw, S·kh·kw] (or a :class:`Whitening`, whose floored Σ is used), ``ranks = (rT, rS)``.
    Starts from :func:`~lowrank.decompose.tucker.hosvd`; each iteration solves (U_T, G) in closed
    form, then moves U_S by :data:`CG_STEPS` steps of preconditioned conjugate gradients on its
    quadratic (module docstring). Special cases in closed form, one step: rS = S (U_S = I) and
    1×1 kernels (the weighted SVD at rank min(rT, rS), the global optimum). Stops after ``n_iter``
    iterations or when the relative Σ-error improves by less than ``tol`` (relative to its value).
    Memory: Σ and a few [d, rS·kh·kw] arrays (d = S·kh·kw); time per iteration: a few products of
    Σ with [d, rS] matrices. A singular solve gets the proximal term δ = ``rel_floor`` × its mean
    diagonal; the errors are those of Σ as given.

    Returns ``(core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS], history)``: the best iterate
    (orthonormal factors), and ``history`` the relative Σ-errors, ``history[0]`` the HOSVD start,
    then one per iteration. Never worse than the start.
    """
    check_weight(W, 4)
    _check_loop(n_iter, tol)
    T, S, kh, kw = W.shape
    rT = check_rank(ranks[0], T, "output rank")
    rS = check_rank(ranks[1], S, "input rank")
    k, d = kh * kw, S * kh * kw
    Sig = _sigma(Sigma, d, W.device)
    rounding = _round_off(Sigma.dtype if isinstance(Sigma, torch.Tensor) else torch.float64)
    W64 = _to64(W)
    W2 = W64.reshape(T, d)
    B = W2 @ Sig                                              # W Σ [T, d]
    total = float((B * W2).sum())                             # ‖W Σ^{1/2}‖²
    if not total > 0:
        raise ValueError("W is zero, or Σ says its inputs never occur (W Σ Wᵀ = 0)")

    def relative(error2):
        return math.sqrt(max(error2, 0.0) / total)

    core, U_T, U_S = hosvd(W64, (rT, rS))
    if rS == S:   # one-sided: U_S = I, the HOSVD start becomes G = W ×₁ U_Tᵀ
        U_S = torch.eye(S, dtype=W64.dtype, device=W64.device)
        core = mode_product(W64, U_T.T, 0)
    C = core.reshape(rT, rS * k)                              # G_(T), columns (j, p)
    if k == 1:
        return _weighted_tucker2_matrix(W64, Sig, B, total, (rT, rS), (C, U_T, U_S), W.dtype)

    # Σ with its column index (s, p) reordered to (p, s), so that every contraction below is one
    # matrix product: Xᵀ Σ' = (X ⊗ I_k)ᵀ Σ, rows (l, q), columns (p, s)
    Sig_ps = Sig.view(S, k, S, k).permute(0, 1, 3, 2).reshape(S, k * d)
    B_ps = B.view(T, S, k).transpose(1, 2).reshape(T * k, S)                  # W Σ, [(t, p), s]
    del Sig                                                   # (a copy, if Σ was not symmetric)

    def transposed_products(X):
        """(X ⊗ I_k)ᵀ Σ for X [S, r]: [r·k, d], rows (l, q), columns (p, s)."""
        return (X.T @ Sig_ps).view(X.shape[1] * k, d)

    def products(U_S, KSig):
        """Σ_K = Kᵀ Σ K [rS·k, rS·k] (rows and columns (j, p)) and W Σ K [T, rS·k] for
        K = U_S ⊗ I_k, from KSig = Kᵀ Σ."""
        Sig_K = (KSig.view(rS * k * k, S) @ U_S).view(rS * k, k, rS).transpose(1, 2).reshape(rS * k, rS * k)
        BK = (B_ps @ U_S).view(T, k, rS).transpose(1, 2).reshape(T, rS * k)
        return Sig_K, BK

    def hessian(KSig_X, N_perm):
        """H(X) [S, rS] of the U_S step from (X ⊗ I_k)ᵀ Σ (module docstring)."""
        return KSig_X.view(-1, S).T @ N_perm

    KSig = transposed_products(U_S)
    Sig_K, BK = products(U_S, KSig)
    history = [relative(total - 2 * float((U_T.T @ BK * C).sum()) + float((C @ Sig_K * C).sum()))]
    best = (history[0], C, U_T, U_S)
    if n_iter and rS < S:
        A, P = _nearest_kronecker(Sig_ps.view(S, k, k, S))
        chol_A = _prox_cholesky(A, rel_floor)
    for it in range(int(n_iter)):
        # (U_T, G) given U_S: weighted SVD of C₀ R, C₀ = W Σ K Σ_K⁻¹, Σ_K = R Rᵀ
        R, delta = _cholesky(Sig_K, rel_floor, rounding)
        C0R = torch.linalg.solve_triangular(R, BK.T, upper=False).T              # W Σ K R⁻ᵀ
        U_T = left_singular_vectors(C0R, rT)
        Y = U_T.T @ C0R
        C = torch.linalg.solve_triangular(R, Y, upper=False, left=False)        # U_Tᵀ C₀ = Y R⁻¹
        error = relative(total - float(Y.square().sum()) - delta * float(C.square().sum()))
        history.append(error)
        if error < best[0]:
            best = (error, C, U_T, U_S)
        if rS == S or it == n_iter - 1 or history[-2] - error < tol * history[-2]:
            break
        # U_S given (U_T, G): CG on H X = g, the quadratic in U_S + X (module docstring)
        N = C.T @ C                                                              # [(j,p), (l,q)]
        N_perm = N.view(rS * k, rS, k).transpose(1, 2).reshape(rS * k * k, rS)   # [((l,q), p), j]
        G = C.view(rT, rS, k)
        g = ((U_T.T @ B).view(rT, S, k).transpose(0, 1).reshape(S, rT * k)
             @ G.permute(0, 2, 1).reshape(rT * k, rS)) - hessian(KSig, N_perm)
        chol_B = _prox_cholesky(torch.einsum("pq,jplq->jl", P, N.view(rS, k, rS, k)), rel_floor)

        def precondition(Rs):                                                    # (A ⊗ B)⁻¹
            return torch.cholesky_solve(torch.cholesky_solve(Rs, chol_A).T, chol_B).T

        X, r = torch.zeros_like(U_S), g
        z = precondition(r)
        p, rz = z, float((r * z).sum())
        for _ in range(CG_STEPS):
            if not rz > 0:
                break
            KSig_p = transposed_products(p)
            Hp = hessian(KSig_p, N_perm)
            pHp = float((p * Hp).sum())
            if not pHp > 0:
                break
            alpha = rz / pHp
            X.add_(p, alpha=alpha)
            r.sub_(Hp, alpha=alpha)
            KSig.add_(KSig_p, alpha=alpha)                                      # ((U_S + X) ⊗ I_k)ᵀ Σ
            z = precondition(r)
            rz, rz_old = float((r * z).sum()), rz
            p = z + (rz / rz_old) * p
        U_S, upper = torch.linalg.qr(U_S + X)                                   # Kᵀ Σ follows: R⁻ᵀ
        diagonal = upper.diagonal().abs()
        if diagonal.min() > 1e-8 * diagonal.max():
            KSig = torch.linalg.solve_triangular(upper.T, KSig.view(rS, k * d), upper=False).reshape(rS * k, d)
        else:                                                                    # U_S + X lost rank
            KSig = transposed_products(U_S)
        Sig_K, BK = products(U_S, KSig)
    _, C, U_T, U_S = best
    core = C.reshape(rT, rS, kh, kw)
    return core.to(W.dtype), U_T.to(W.dtype), U_S.to(W.dtype), history


def _weighted_tucker2_matrix(W64, Sig, B, total, ranks, start, dtype):
    """:func:`weighted_tucker2` of a 1×1 kernel [T, S, 1, 1]: U_T G U_Sᵀ has rank r = min(rT, rS),
    and the best rank-r matrix is U_r U_rᵀ W with U_r the leading eigenvectors of W Σ Wᵀ (the
    weighted SVD). U_T = U_r and U_S = an orthonormal basis of the rows of U_rᵀ W, each completed
    to its rank by orthonormal columns (their part of G is zero)."""
    (rT, rS), (C, U_T0, U_S0) = ranks, start
    T, S = W64.shape[:2]
    W2 = W64.reshape(T, S)
    history = [math.sqrt(max(total - 2 * float((U_T0.T @ B @ U_S0 * C).sum())
                             + float((C @ U_S0.T @ Sig @ U_S0 * C).sum()), 0.0) / total)]
    U_r = left_singular_vectors(B @ W2.T, min(rT, rS))                          # of W Σ Wᵀ [T, T]
    U_T = torch.linalg.qr(U_r, mode="complete")[0][:, :rT]
    U_S = torch.linalg.qr((U_r.T @ W2).T, mode="complete")[0][:, :rS]
    optimum = U_T.T @ (U_r @ (U_r.T @ W2)) @ U_S                                # G of U_r U_rᵀ W
    E = W2 - U_T @ optimum @ U_S.T
    history.append(math.sqrt(max(float((E @ Sig * E).sum()), 0.0) / total))
    if history[1] > history[0]:                 # the start can only tie, up to round-off
        return C.reshape(rT, rS, 1, 1).to(dtype), U_T0.to(dtype), U_S0.to(dtype), history
    return optimum.reshape(rT, rS, 1, 1).to(dtype), U_T.to(dtype), U_S.to(dtype), history


def weighted_cp(W: torch.Tensor, Sigma, rank: int, form: str = "4way", n_iter: int = 50,
                tol: float = 1e-6, rel_floor: float = 1e-10, init: CPResult | None = None) -> CPResult:
    """CP of a conv kernel W [T, S, kh, kw] minimising ‖(W − Ŵ) Σ^{1/2}‖_F (ALS, module docstring).

    ``form``: ``"4way"`` (factors T, S, kh, kw) or ``"3way"`` (T, S, kh·kw), as in
    :func:`~lowrank.decompose.cp.conv_cp`. Σ [S·kh·kw, S·kh·kw] (or a :class:`Whitening`).
    Starts from ``init`` (a :class:`~lowrank.decompose.cp.CPResult` of that form) or from
    ``conv_cp(W, rank, form)``. Stops after ``n_iter`` sweeps or when the relative Σ-error
    improves by less than ``tol`` (relative to its value). Each solve carries the proximal term
    δ = ``rel_floor`` × its mean diagonal (module docstring).

    Returns a :class:`~lowrank.decompose.cp.CPResult` of the best iterate (never worse than the
    start) whose ``relative_error`` and ``history`` are relative Σ-errors, ``history[0]`` the
    start's. Warns with ``CPDegeneracyWarning`` when its components cancel each other or some
    vanished (see :func:`~lowrank.decompose.cp.check_vanished`).
    """
    check_weight(W, 4)
    _check_loop(n_iter, tol)
    if form not in ("4way", "3way"):
        raise ValueError(f"form must be '4way' or '3way', got {form!r}")
    T, S, kh, kw = W.shape
    d = S * kh * kw
    shape = (S, kh, kw) if form == "4way" else (S, kh * kw)          # input modes
    Sig = _sigma(Sigma, d, W.device)
    W2 = _to64(W).reshape(T, d)
    total = ((W2 @ Sig) * W2).sum()
    if total <= 0:
        raise ValueError("W is zero")
    if init is None:
        init = conv_cp(W, rank, form)
    elif [f.shape[0] for f in init.factors] != [T, *shape] or init.weights.shape[0] != rank:
        raise ValueError(f"init has factors of sizes {[tuple(f.shape) for f in init.factors]}, "
                         f"expected [I_n, {rank}] for I_n in {[T, *shape]}")
    A = _to64(init.factors[0] * init.weights).to(W2)
    X = [_to64(f).to(W2).clone() for f in init.factors[1:]]  # updated in place below
    m = len(shape)
    Sig_nd = Sig.reshape(*shape, *shape)

    def residual(A, X):
        return W2 - A @ khatri_rao(X).T

    history = [_error(residual(A, X), Sig, total)]
    best = (history[0], A, [x.clone() for x in X])
    converged, sweeps = False, 0
    for sweeps in range(1, int(n_iter) + 1):
        # A: A (Mᵀ Σ M) = W Σ M, one step from the current A
        M = khatri_rao(X)
        SigM = Sig @ M
        gram = M.T @ SigM
        A = A + _prox_step(gram, (W2 @ SigM - A @ gram).T, rel_floor).T
        for n in range(m):
            # X_n column by column: each an exact I_n × I_n solve on the current residual
            others = [i for i in range(m) if i != n]
            In, O = shape[n], d // shape[n]
            perm = [n, *others]
            Sig_p = Sig_nd.permute(*perm, *(m + i for i in perm)).reshape(In, O, In, O)
            K = khatri_rao([X[i] for i in others])                              # [O, R]
            F = residual(A, X).reshape(T, *shape).permute(0, *(1 + i for i in perm)).reshape(T, d)
            F = F @ Sig_p.reshape(d, d)                                         # E Σ, permuted
            for first in range(0, rank, O):     # O components at a time: their Σ J_q fill one Σ
                Kc = K[:, first:first + O]
                SJ = (Sig_p.reshape(In * O * In, O) @ Kc).reshape(In, O, In, -1)   # Σ J_q
                Hq = (SJ * Kc[None, :, None, :]).sum(1).permute(2, 0, 1)         # J_qᵀ Σ J_q [c, In, In]
                chol = _prox_cholesky(Hq * A[:, first:first + O].square().sum(0)[:, None, None], rel_floor)
                SJ = SJ.permute(3, 0, 1, 2).reshape(-1, d, In)
                for i in range(len(chol)):
                    q = first + i
                    g = (A[:, q] @ F).reshape(In, O) @ K[:, q]                  # J_qᵀ Σ Eᵀ a_q
                    step = torch.cholesky_solve(g[:, None], chol[i])[:, 0]
                    X[n][:, q] += step
                    F -= torch.outer(A[:, q], SJ[i] @ step)
        for n in range(m):
            norms = torch.linalg.vector_norm(X[n], dim=0).clamp(min=torch.finfo(W2.dtype).tiny)
            X[n] = X[n] / norms
            A = A * norms
        error = _error(residual(A, X), Sig, total)
        history.append(error)
        if error < best[0]:
            best = (error, A.clone(), [x.clone() for x in X])
        if history[-2] - error < tol * history[-2]:
            converged = True
            break
    error, A, X = best
    weights = torch.linalg.vector_norm(A, dim=0)
    A = A / weights.clamp(min=torch.finfo(W2.dtype).tiny)
    norm_W = float(torch.linalg.vector_norm(W2))
    norm_ratio = float(weights.sum()) / norm_W
    if not check_vanished(weights, norm_W, error) and norm_ratio > 10 * math.sqrt(rank):
        warnings.warn(f"Σ-weighted CP rank {rank}: sum of |weights| / ‖W‖ ≈ {norm_ratio:.3g} "
                      "(components cancel each other: the CP is degenerate)",
                      CPDegeneracyWarning, stacklevel=2)
    return CPResult(weights.to(W.dtype), [f.to(W.dtype) for f in (A, *X)], error, sweeps,
                    converged, history)
