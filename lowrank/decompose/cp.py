"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, and of conv kernels.

A rank-R CP of an order-N tensor W [I_0, ..., I_{N-1}] is

    W ≈ Σ_q λ_q a⁽⁰⁾_q ∘ a⁽¹⁾_q ∘ ... ∘ a⁽ᴺ⁻¹⁾_q,

kept as ``weights`` λ [R] and ``factors`` A_n [I_n, R] with unit-norm columns.
"""
import math
import warnings
from dataclasses import dataclass

import torch

from .svd import check_rank, check_weight
from .tucker import unfold


class CPDegeneracyWarning(UserWarning):
    """CP-ALS ended with a poor fit or with components that cancel each other (degeneracy)."""


@dataclass
class CPResult:
    """A CP decomposition and how it was reached.

    ``weights`` [R]; ``factors`` list of [I_n, R] with unit-norm columns; ``relative_error``
    ‖W − Ŵ‖_F / ‖W‖_F of the returned factors; ``n_iter`` ALS sweeps done; ``converged`` whether
    the stopping rule fired before ``n_iter_max``; ``history`` the relative error after each sweep.
    """

    weights: torch.Tensor
    factors: list
    relative_error: float
    n_iter: int
    converged: bool
    history: list

    def reconstruct(self) -> torch.Tensor:
        """The full tensor Ŵ [I_0, ..., I_{N-1}]."""
        return cp_reconstruct(self.weights, self.factors)


def khatri_rao(matrices) -> torch.Tensor:
    """Column-wise Kronecker product of [I_k, R] matrices → [Π I_k, R], the first index slowest."""
    K = matrices[0]
    for M in matrices[1:]:
        K = (K[:, None, :] * M[None, :, :]).reshape(-1, K.shape[1])
    return K


def cp_reconstruct(weights: torch.Tensor, factors) -> torch.Tensor:
    """``Σ_q λ_q a⁽⁰⁾_q ∘ ... ∘ a⁽ᴺ⁻¹⁾_q``: weights [R], factors [I_n, R] → tensor [I_0, ..., I_{N-1}]."""
    shape = [A.shape[0] for A in factors]
    return ((factors[0] * weights) @ khatri_rao(factors[1:]).T).reshape(shape)


def _start(W: torch.Tensor, rank: int, init: str, seed: int):
    """Initial factors [I_n, R] with unit-norm columns.

    ``"svd"``: leading left singular vectors of each unfolding W_(n) (eigenvectors of the small
    Gram W_(n) W_(n)ᵀ), padded with seeded Gaussian columns when R > I_n. ``"random"``: seeded
    Gaussian columns. The mode-0 start is never used (ALS solves mode 0 first), so it is zero.
    """
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.zeros(W.shape[0], rank, dtype=W.dtype, device=W.device)]
    for n in range(1, W.dim()):
        A = torch.randn(W.shape[n], rank, generator=generator, dtype=W.dtype).to(W.device)
        if init == "svd":
            Wn = unfold(W, n)
            U = torch.linalg.eigh(Wn @ Wn.T)[1].flip(1)     # descending eigenvalues
            k = min(rank, W.shape[n])
            A = torch.cat([U[:, :k], A[:, k:]], dim=1)
        factors.append(A / torch.linalg.vector_norm(A, dim=0))
    return factors


def _group_mttkrp(Y: torch.Tensor, factors, j: int) -> torch.Tensor:
    """MTTKRP of the j-th mode of a partial contraction Y [I_a, ..., I_b, R] of a group of modes.

    ``factors`` are the group's [I_k, R]; returns Σ over the group's other modes → [I_j, R].
    """
    m = Y.dim() - 1
    if m == 1:
        return Y
    operands = [Y, list(range(m + 1))]
    for k, A in enumerate(factors):
        if k != j:
            operands += [A, [k, m]]
    return torch.einsum(*operands, [j, m])


def cp_als(W: torch.Tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-6,
           ridge: float = 1e-8, init: str = "svd", seed: int = 0) -> CPResult:
    """Rank-``rank`` CP of a tensor W [I_0, ..., I_{N-1}] (N ≥ 3) by alternating least squares.

    Each sweep solves modes 0, ..., N-1 in turn: A_n = MTTKRP_n · (⊛_{k≠n} A_kᵀA_k + ε I)⁻¹ with
    the Gram matrix a Hadamard product of factor Grams, a ridge ε = ``ridge`` × its mean diagonal,
    a Cholesky solve, then columns normalised into ``weights``. MTTKRPs go through W seen once as
    a [first half of modes, second half] matrix: one matmul per half per sweep, no unfolding
    copies. The fit is computed from Grams and the last MTTKRP (no reconstruction).
    Stops when the relative error changes by less than ``tol`` between sweeps.
    Computes in float64 where W is float32 or float64; returns W's dtype and device.

    Warns with :class:`CPDegeneracyWarning` when components cancel (Σ_q |λ_q| / ‖W‖_F large) or
    the fit is no better than zero. Returns a :class:`CPResult`.
    """
    if W.dim() < 3:
        raise ValueError(f"CP needs a tensor of order 3 or more, got shape {tuple(W.shape)}")
    check_weight(W, W.dim())
    if not W.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {W.dtype}")
    shape = tuple(W.shape)
    rank = check_rank(rank, math.prod(shape) // max(shape), "CP rank")
    if isinstance(n_iter_max, bool) or int(n_iter_max) != n_iter_max or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be a positive integer, got {n_iter_max!r}")
    if not (tol >= 0 and ridge >= 0):
        raise ValueError(f"tol and ridge must be >= 0, got tol={tol!r}, ridge={ridge!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    X = W.to(torch.float64) if W.dtype in (torch.float32, torch.float16, torch.bfloat16) else W
    norm_X = torch.linalg.vector_norm(X)
    if norm_X == 0:
        raise ValueError("cannot decompose an all-zero tensor")

    N, h = X.dim(), X.dim() // 2
    left, right = list(range(h)), list(range(h, N))
    X2 = X.reshape(math.prod(shape[:h]), -1)                # [Π left dims, Π right dims]
    A = _start(X, rank, init, seed)
    G = [a.T @ a for a in A]
    eye = torch.eye(rank, dtype=X.dtype, device=X.device)
    history, converged = [], False
    for it in range(int(n_iter_max)):
        for group, others, Xg in ((left, right, X2), (right, left, X2.T)):
            # partial contraction of W with the other half's factors: [group dims..., R]
            Y = (Xg @ khatri_rao([A[k] for k in others])).reshape(*[shape[k] for k in group], rank)
            for j, n in enumerate(group):
                M = _group_mttkrp(Y, [A[k] for k in group], j)       # [I_n, R]
                V = math.prod(G[k] for k in range(N) if k != n)     # [R, R]
                L = torch.linalg.cholesky(V + ridge * V.diagonal().mean() * eye)
                B = torch.cholesky_solve(M.T, L).T                   # [I_n, R], unnormalised
                lam = torch.linalg.vector_norm(B, dim=0)
                A[n] = B / lam.clamp_min(torch.finfo(X.dtype).tiny)
                G[n] = A[n].T @ A[n]
        # ‖X − X̂‖² = ‖X‖² + ‖X̂‖² − 2⟨X, X̂⟩ with ‖X̂‖² = Σ V ⊙ BᵀB and ⟨X, X̂⟩ = Σ M ⊙ B.
        err2 = norm_X ** 2 + (V * (B.T @ B)).sum() - 2 * (M * B).sum()
        history.append(float(err2.clamp_min(0).sqrt() / norm_X))
        if it > 0 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break

    weights = lam
    W_hat = cp_reconstruct(weights, A)
    relative_error = float(torch.linalg.vector_norm(X - W_hat) / norm_X)
    norm_ratio = float(weights.abs().sum() / norm_X)
    if not math.isfinite(relative_error) or relative_error >= 1.0 or norm_ratio > 10 * math.sqrt(rank):
        warnings.warn(
            f"CP-ALS rank {rank}: relative error {relative_error:.3g}, sum of |weights| / ‖W‖ = "
            f"{norm_ratio:.3g} (components cancel each other: the CP is degenerate or the fit is poor)",
            CPDegeneracyWarning, stacklevel=2)
    return CPResult(weights.to(W.dtype), [a.to(W.dtype) for a in A], relative_error,
                    it + 1, converged, history)


def conv_cp(W: torch.Tensor, rank: int, form: str = "4way", **kw) -> CPResult:
    """CP of a conv kernel W [T, S, kh, kw].

    ``form="4way"``: factors in the order T [T, R], S [S, R], kh [kh, R], kw [kw, R].
    ``form="3way"``: the kernel positions merged first, W.reshape(T, S, kh·kw); factors
    T [T, R], S [S, R], kh·kw [kh·kw, R] with row i·kw + j for kernel position (i, j).
    Keyword arguments go to :func:`cp_als`. Returns a :class:`CPResult`.
    """
    check_weight(W, 4)
    if form == "4way":
        return cp_als(W, rank, **kw)
    if form == "3way":
        T, S, kh, kw_ = W.shape
        return cp_als(W.reshape(T, S, kh * kw_), rank, **kw)
    raise ValueError(f"form must be '4way' or '3way', got {form!r}")
