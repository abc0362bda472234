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
    """Initial factors, transposed: [R, I_n] with unit-norm rows (one row per component).

    ``"svd"``: leading left singular vectors of each unfolding W_(n) (eigenvectors of the small
    Gram W_(n) W_(n)ᵀ), padded with seeded Gaussian vectors when R > I_n. ``"random"``: seeded
    Gaussian vectors. Mode 0 starts at zero: ALS solves it first, from the other modes alone.
    """
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.zeros(rank, W.shape[0], dtype=W.dtype, device=W.device)]
    for n in range(1, W.dim()):
        A = torch.randn(rank, W.shape[n], generator=generator, dtype=W.dtype).to(W.device)
        if init == "svd":
            Wn = unfold(W, n)
            U = torch.linalg.eigh(Wn @ Wn.T)[1].flip(1)     # descending eigenvalues
            k = min(rank, W.shape[n])
            A = torch.cat([U[:, :k].T, A[k:]])
        factors.append(A / torch.linalg.vector_norm(A, dim=1, keepdim=True))
    return factors


def _khatri_rao_rows(factors) -> torch.Tensor:
    """Row-wise Kronecker product of [R, I_k] matrices → [R, Π I_k], the first index slowest."""
    K = factors[0]
    for F in factors[1:]:
        K = (K[:, :, None] * F[:, None, :]).reshape(K.shape[0], -1)
    return K


def cp_als(W: torch.Tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-6,
           ridge: float = 1e-3, init: str = "svd", seed: int = 0,
           line_search: bool = True) -> CPResult:
    """Rank-``rank`` CP of a tensor W [I_0, ..., I_{N-1}] (N ≥ 3) by alternating least squares.

    Each sweep solves modes 0, ..., N-1 in turn: A_n = MTTKRP_n (⊛_{k≠n} A_kᵀA_k + ε I)⁻¹, the
    Gram matrix a Hadamard product of factor Grams, solved by Cholesky with a ridge ε = ``ridge``
    (the Gram's diagonal is 1: columns are normalised into ``weights`` after every solve).
    MTTKRPs come from W seen once as a [first half of modes, second half] matrix: one matmul per
    half per sweep, no Khatri–Rao product of more than half the modes. The fit comes from Grams
    and the last MTTKRP (no reconstruction). ``line_search``: extrapolate modes 1..N-1 along the
    last sweep's change (Bro 1998) and keep the step only if it lowers the error.
    Stops when the relative error changes by less than ``tol`` between sweeps.
    Computes in float64; returns W's dtype and device.

    Warns with :class:`CPDegeneracyWarning` when components cancel (Σ_q |λ_q| / ‖W‖_F large) or
    the fit is no better than zero. Returns a :class:`CPResult`.
    """
    if W.dim() < 3:
        raise ValueError(f"CP needs a tensor of order 3 or more, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {W.dtype}")
    check_weight(W, W.dim())
    shape = tuple(W.shape)
    rank = check_rank(rank, math.prod(shape) // max(shape), "CP rank")
    if isinstance(n_iter_max, bool) or int(n_iter_max) != n_iter_max or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be a positive integer, got {n_iter_max!r}")
    if not (tol >= 0 and ridge >= 0):
        raise ValueError(f"tol and ridge must be >= 0, got tol={tol!r}, ridge={ridge!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    X = W.to(torch.float64)
    norm_X2 = float(X.square().sum())
    if norm_X2 == 0:
        raise ValueError("cannot decompose an all-zero tensor")

    N = X.dim()
    X0 = X.reshape(shape[0], -1)                             # W_(0) [I_0, I_1·...·I_{N-1}]
    X1 = X.movedim(1, 0).reshape(shape[1], -1)               # W_(1) [I_1, I_0·I_2·...·I_{N-1}]
    F = _start(X, rank, init, seed)                          # factors, transposed: [R, I_n]
    G = [f @ f.mT for f in F]                                # Grams [R, R]
    tiny = torch.finfo(X.dtype).tiny
    eye = torch.eye(rank, dtype=X.dtype, device=X.device)

    def solve(n, M):
        """Least-squares update of mode n from its MTTKRP M [R, I_n]; returns what ``error`` needs."""
        others = [G[k] for k in range(N) if k != n]
        V = torch.addcmul(eps * eye, math.prod(others[:-1]), others[-1])  # ⊛_{k≠n} G_k + εI [R, R]
        B = torch.cholesky_inverse(torch.linalg.cholesky_ex(V)[0]) @ M   # [R, I_n], unnormalised
        lam = torch.linalg.vector_norm(B, dim=1, keepdim=True).clamp_min_(tiny)
        F[n] = B / lam
        G[n] = F[n] @ F[n].mT
        return lam, B, M

    def error(lam, B, M):
        """Relative error after a solve: ‖X − X̂‖² = ‖X‖² − ⟨B, M⟩ − ε‖B‖², as (V + εI)B = M."""
        return math.sqrt(max(norm_X2 - float((B * M).sum() + eps * lam.square().sum()), 0.0) / norm_X2)

    def mode0():
        """Update mode 0 from W_(1) contracted with A_1, then with A_2 ⊙ ... ⊙ A_{N-1}."""
        Z = (F[1] @ X1).view(rank, shape[0], -1)                        # [R, I_0, I_2·...]
        return solve(0, (Z @ _khatri_rao_rows(F[2:])[:, :, None])[:, :, 0])

    history, converged, step, previous = [], False, 1.0, None
    for it in range(int(n_iter_max)):
        eps = ridge * (history[-1] if history else 1.0)     # ridge ∝ residual: vanishes at an exact fit
        current = (F[1:], G[1:])
        extrapolate = line_search and previous is not None
        if extrapolate:                                      # A_n + step (A_n − A_n of the sweep before)
            for n in range(1, N):
                F[n] = torch.lerp(previous[n - 1], F[n], 1 + step)
                G[n] = F[n] @ F[n].mT
        out = mode0()
        if extrapolate:
            if error(*out) < history[-1]:
                step = min(_GROW * step, _MAX_STEP)
            else:                                            # reject the step: plain ALS sweep
                F[1:], G[1:] = list(current[0]), list(current[1])
                step = max(step * _SHRINK, _MIN_STEP)
                out = mode0()
        previous = current[0]
        Z = F[0] @ X0                                        # [R, I_1·...·I_{N-1}]
        for n in range(1, N):                                # Z: W contracted with A_0, ..., A_{n-1}
            Z = Z.view(rank, shape[n], -1)
            M = Z[:, :, 0] if n == N - 1 else (Z @ _khatri_rao_rows(F[n + 1:])[:, :, None])[:, :, 0]
            out = solve(n, M)
            Z = (F[n][:, None, :] @ Z)[:, 0]
        history.append(error(*out))
        if it > 0 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break

    lam = out[0][:, 0]
    weights, factors = lam, [f.T for f in F]
    relative_error = float(torch.linalg.vector_norm(X - cp_reconstruct(weights, factors))) / math.sqrt(norm_X2)
    norm_ratio = float(weights.abs().sum()) / math.sqrt(norm_X2)
    if not math.isfinite(relative_error) or relative_error >= 1.0 or norm_ratio > 10 * math.sqrt(rank):
        warnings.warn(
            f"CP-ALS rank {rank}: relative error {relative_error:.3g}, sum of |weights| / ‖W‖ = "
            f"{norm_ratio:.3g} (components cancel each other: the CP is degenerate or the fit is poor)",
            CPDegeneracyWarning, stacklevel=2)
    return CPResult(weights.to(W.dtype), [a.to(W.dtype) for a in factors], relative_error,
                    it + 1, converged, history)


_MAX_STEP, _MIN_STEP, _GROW, _SHRINK = 8.0, 0.05, 2.0, 0.25


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
