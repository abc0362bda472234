"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, and of conv kernels.

A rank-R CP of an order-N tensor W [I_0, ..., I_{N-1}] is

    W ≈ Σ_q λ_q a⁽⁰⁾_q ∘ a⁽¹⁾_q ∘ ... ∘ a⁽ᴺ⁻¹⁾_q,

kept as ``weights`` λ [R] and ``factors`` A_n [I_n, R] with unit-norm columns a⁽ⁿ⁾_q.
"""
import math
import warnings
from dataclasses import dataclass

import torch

from .svd import check_rank, check_weight
from .tucker import unfold

# Line search (extrapolation) step: grows ×2 after a kept step, shrinks ×1/4 after a rejected one.
MAX_STEP, MIN_STEP = 8.0, 0.05
# Degeneracy (Harshman's diagnostic): two rank-one terms nearly opposite, congruence below this;
# or Σ_q |λ_q| / ‖W‖ above WEIGHT_RATIO √R (R orthogonal components of equal weight give √R).
DEGENERATE_CONGRUENCE, WEIGHT_RATIO = -0.9, 10.0
# A component has vanished when its weight is below this fraction of ‖W‖ (sqrt of float64 eps).
VANISHED = 1.5e-8


class CPDegeneracyWarning(UserWarning):
    """CP-ALS ended with components that cancel each other (degeneracy), with components that
    vanished (a fit of lower rank than asked), or with a useless fit."""


@dataclass
class CPResult:
    """A CP decomposition and how it was reached.

    ``weights`` λ [R]; ``factors`` list of A_n [I_n, R] with unit-norm columns; ``relative_error``
    ‖W − Ŵ‖_F / ‖W‖_F of the returned decomposition; ``n_iter`` ALS sweeps done; ``converged``
    whether the stopping rule fired before ``n_iter_max``; ``history`` the relative error after
    each sweep.
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


def _khatri_rao_rows(factors) -> torch.Tensor:
    """Row-wise Kronecker product of [R, I_k] matrices → [R, Π I_k], the first index slowest."""
    K = factors[0]
    for F in factors[1:]:
        K = (K[:, :, None] * F[:, None, :]).reshape(K.shape[0], -1)
    return K


def cp_reconstruct(weights: torch.Tensor, factors) -> torch.Tensor:
    """``Σ_q λ_q a⁽⁰⁾_q ∘ ... ∘ a⁽ᴺ⁻¹⁾_q``: weights [R], factors [I_n, R] → tensor [I_0, ..., I_{N-1}]."""
    shape = [A.shape[0] for A in factors]
    return ((factors[0] * weights) @ _khatri_rao_rows([A.T for A in factors[1:]])).reshape(shape)


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
            U = torch.linalg.eigh(Wn @ Wn.T)[1].flip(1)     # by descending eigenvalue
            k = min(rank, W.shape[n])
            A = torch.cat([U[:, :k].T, A[k:]])
        factors.append(A / torch.linalg.vector_norm(A, dim=1, keepdim=True))
    return factors


def cp_als(W: torch.Tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-6,
           ridge: float = 1e-3, init: str = "svd", seed: int = 0,
           line_search: bool = True) -> CPResult:
    """Rank-``rank`` CP of a tensor W [I_0, ..., I_{N-1}] (N ≥ 3) by alternating least squares.

    A sweep updates modes 0, ..., N-1 in turn: A_n ← MTTKRP_n (V_n + εI)⁻¹ with V_n = ⊛_{k≠n} A_kᵀA_k
    (Hadamard product of factor Grams) by a Cholesky factorisation, then normalises the columns
    into the weights. The columns have unit norm, so V_n has a unit diagonal and the ridge
    ε = ``ridge`` × (relative error of the previous sweep) is relative to its scale; it shrinks as
    the fit becomes exact, down to ``ridge`` × 1.5e-8 (so that every solve stays defined).
    MTTKRPs: W_(1) times A_1 gives mode 0's; W_(0) times the new A_0, contracted one mode at a
    time, gives all the others (two matmuls with W per sweep, no Khatri–Rao product of the large
    modes). The error comes from the last MTTKRP, no reconstruction.

    ``line_search``: before a sweep, move modes 1..N-1 further along the previous sweep's change
    (Bro 1998) and keep the move only if the error after solving mode 0 is lower than before.
    ``init``: ``"svd"`` (leading left singular vectors of each unfolding, seeded Gaussian columns
    where R > I_n) or ``"random"``. Stops when the relative error changes by less than ``tol``
    between sweeps (TensorLy's ``parafac`` rule). Computes in float64; returns W's dtype and device.

    Warns with :class:`CPDegeneracyWarning` when components cancel each other (degeneracy), when a
    component vanished (weight below 1.5e-8 ‖W‖: a fit of lower rank), or when the fit is no
    better than zero. Raises ``torch.linalg.LinAlgError`` (saying what to change) when an update
    is singular, which only ``ridge=0`` allows. Returns a :class:`CPResult`.
    """
    if W.dim() < 3:
        raise ValueError(f"CP needs a tensor of order 3 or more, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {W.dtype}")
    check_weight(W, W.dim())
    rank = check_rank(rank, math.prod(W.shape) // max(W.shape), "CP rank")
    if isinstance(n_iter_max, bool) or int(n_iter_max) != n_iter_max or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be a positive integer, got {n_iter_max!r}")
    if not (tol >= 0 and ridge >= 0):
        raise ValueError(f"tol and ridge must be >= 0, got tol={tol!r}, ridge={ridge!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    weights, factors, relative_error, n_iter, converged, history = _als(
        W.detach(), rank, int(n_iter_max), tol, ridge, init, seed, line_search)
    # clones made outside inference mode are ordinary tensors (usable with autograd later)
    return CPResult(weights.to(W.dtype).clone(), [A.to(W.dtype).clone() for A in factors],
                    relative_error, n_iter, converged, history)


@torch.inference_mode()
def _als(W, rank, n_iter_max, tol, ridge, init, seed, line_search):
    """The sweeps of :func:`cp_als` (arguments checked there), without autograd bookkeeping."""
    X = W.to(torch.float64)
    shape = tuple(X.shape)
    norm_X2 = float(X.square().sum())
    if norm_X2 == 0:
        raise ValueError("cannot decompose an all-zero tensor")

    N = X.dim()
    X0 = X.reshape(shape[0], -1)                             # W_(0) [I_0, I_1·...·I_{N-1}]
    X1 = X.movedim(1, 0).reshape(shape[1], -1)               # W_(1) [I_1, I_0·I_2·...·I_{N-1}]
    F = _start(X, rank, init, seed)                          # factors, transposed: [R, I_n]
    G = [f @ f.mT for f in F]                                # their Grams [R, R]
    eye = torch.eye(rank, dtype=X.dtype, device=X.device)
    tiny = torch.finfo(X.dtype).tiny
    failed = torch.zeros(N, dtype=torch.int32, device=X.device)   # per mode: singular Grams

    def solve(n, M):
        """Update mode n from its MTTKRP M [R, I_n]; returns (λ [R, 1], B [R, I_n], M)."""
        others = [G[k] for k in range(N) if k != n]
        V = others[0]
        for Gk in others[1:-1]:
            V = V * Gk
        V = torch.addcmul(ridge_eye, V, others[-1])         # ⊛_{k≠n} A_kᵀA_k + εI [R, R]
        L, info = torch.linalg.cholesky_ex(V)
        failed[n] += info                                    # checked once per sweep
        B = torch.cholesky_solve(M, L)                       # unnormalised A_nᵀ
        lam = torch.linalg.vector_norm(B, dim=1, keepdim=True).clamp_min_(tiny)
        F[n] = B / lam
        G[n] = F[n] @ F[n].mT
        return lam, B, M

    def error(lam, B, M):
        """Relative error after a solve: ‖X − X̂‖² = ‖X‖² − ⟨B, M⟩ − ε‖B‖², as (V + εI)B = M."""
        return math.sqrt(max(norm_X2 - float((B * M).sum() + eps * lam.square().sum()), 0.0) / norm_X2)

    def solve_mode0(K):
        Z = (F[1] @ X1).view(rank, shape[0], -1)             # W ×₁ A_1: [R, I_0, I_2·...]
        return solve(0, (Z @ K)[:, :, 0])

    history, converged, step, previous = [], False, 1.0, None
    for it in range(n_iter_max):
        eps = ridge * max(history[-1] if history else 1.0, VANISHED)    # > 0 even for an exact fit
        ridge_eye = eps * eye
        current = (F[1:], G[1:])
        extrapolate = line_search and previous is not None
        if extrapolate:                                      # A_n + step (A_n − A_n one sweep ago)
            for n in range(1, N):
                F[n] = torch.lerp(previous[n - 1], F[n], 1 + step)
                G[n] = F[n] @ F[n].mT
        K = _khatri_rao_rows(F[2:])[:, :, None]              # A_2 ⊙ ... ⊙ A_{N-1}, for modes 0 and 1
        out = solve_mode0(K)
        if extrapolate:
            if error(*out) < history[-1]:
                step = min(2 * step, MAX_STEP)
            else:                                            # reject the move: plain ALS sweep
                F[1:], G[1:] = list(current[0]), list(current[1])
                step = max(step / 4, MIN_STEP)
                K = _khatri_rao_rows(F[2:])[:, :, None]
                out = solve_mode0(K)
        previous = current[0]
        Z = F[0] @ X0                                        # W ×₀ A_0: [R, I_1·...·I_{N-1}]
        for n in range(1, N):                                # Z = W ×₀ A_0 ... ×_{n-1} A_{n-1}
            Z = Z.view(rank, shape[n], -1)
            if n < N - 1:
                K = K if n == 1 else _khatri_rao_rows(F[n + 1:])[:, :, None]
                M = (Z @ K)[:, :, 0]
            else:
                M = Z[:, :, 0]
            out = solve(n, M)
            Z = (F[n][:, None, :] @ Z)[:, 0]
        history.append(error(*out))
        if failed.any():
            modes = failed.nonzero()[:, 0].tolist()
            raise torch.linalg.LinAlgError(
                f"CP-ALS rank {rank}, sweep {it + 1}: the Gram matrix ⊛_(k≠n) A_kᵀA_k of mode(s) {modes} "
                f"is singular (two components became collinear, or one vanished), so its least-squares "
                f"update is undefined{' with ridge=0' if ridge == 0 else ''}. Use ridge > 0 (the default "
                f"1e-3 keeps every update solvable), a lower rank, or another start (init='random', seed)")
        if it > 0 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break

    weights, factors = out[0][:, 0], [f.T for f in F]
    relative_error = float(torch.linalg.vector_norm(X - cp_reconstruct(weights, factors))) / math.sqrt(norm_X2)
    _check_degeneracy(weights, factors, relative_error, math.sqrt(norm_X2))
    return weights, factors, relative_error, it + 1, converged, history


def check_vanished(weights, norm_W: float, relative_error: float, stacklevel: int = 2) -> bool:
    """Warn (:class:`CPDegeneracyWarning`) and return True if some weights λ_q [R] are below
    ``VANISHED`` · ‖W‖: those components fit nothing, and the result is in effect of lower rank.

    ALS cannot revive such a component (its own least-squares update is zero), so it stops there.
    It happens when a rank-R approximation does not exist (de Silva & Lim 2008: the infimum is
    then approached only by diverging components) or when the start is unlucky.
    """
    vanished = (weights.abs() < VANISHED * norm_W).nonzero()[:, 0].tolist()
    if vanished:
        R = weights.shape[0]
        warnings.warn(
            f"CP rank {R}: component(s) {vanished} vanished (weight {float(weights[vanished[0]]):.3g}, "
            f"‖W‖ = {norm_W:.3g}), so the result is in effect of rank {R - len(vanished)}, relative "
            f"error {relative_error:.3g}. A rank-{R} approximation may not exist (degenerate tensor) "
            f"or the start was unlucky: try init='random' or another seed, or a lower rank",
            CPDegeneracyWarning, stacklevel=stacklevel + 1)
    return bool(vanished)


def _check_degeneracy(weights, factors, relative_error, norm_W):
    """Warn (:class:`CPDegeneracyWarning`) if components vanished, cancel each other, or the fit
    is useless.

    The congruence of rank-one terms p and q, ⟨u_p, u_q⟩ = Π_n ⟨a⁽ⁿ⁾_p, a⁽ⁿ⁾_q⟩, near −1 means
    two terms that are nearly opposite: their large weights cancel (CP degeneracy).
    """
    if check_vanished(weights, norm_W, relative_error, stacklevel=5):   # the caller of cp_als
        return
    R = weights.shape[0]
    congruence = math.prod(A.T @ A for A in factors).fill_diagonal_(0)     # [R, R]
    worst = float(congruence.min()) if R > 1 else 0.0
    ratio = float(weights.abs().sum()) / norm_W
    if (relative_error < 1.0 and worst > DEGENERATE_CONGRUENCE
            and ratio < WEIGHT_RATIO * math.sqrt(R)):                       # False for NaN too
        return
    warnings.warn(
        f"CP rank {R}: relative error {relative_error:.3g}, sum of |weights| / ‖W‖ = {ratio:.3g}, "
        f"most opposite pair of components has congruence {worst:.3f}: components cancel each "
        f"other (degenerate CP) or the fit is poor; try a lower rank or a larger ridge",
        CPDegeneracyWarning, stacklevel=5)             # the caller of cp_als


def conv_cp(W: torch.Tensor, rank: int, form: str = "4way", **kw) -> CPResult:
    """CP of a conv kernel W [T, S, kh, kw]; keyword arguments go to :func:`cp_als`.

    ``form="4way"``: factors in the order T [T, R], S [S, R], kh [kh, R], kw [kw, R].
    ``form="3way"``: the kernel positions merged first, W.reshape(T, S, kh·kw); factors
    T [T, R], S [S, R], kh·kw [kh·kw, R] with row i·kw + j for kernel position (i, j).
    Returns a :class:`CPResult`.
    """
    check_weight(W, 4)
    if form == "4way":
        return cp_als(W, rank, **kw)
    if form == "3way":
        T, S, kh, kw_ = W.shape
        return cp_als(W.reshape(T, S, kh * kw_), rank, **kw)
    raise ValueError(f"form must be '4way' or '3way', got {form!r}")
