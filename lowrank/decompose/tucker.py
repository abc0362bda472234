"""Tucker-2 of a conv kernel: W [T, S, kh, kw] ≈ G ×₁ U_T ×₂ U_S, the spatial modes left alone."""
import torch

from .svd import check_rank, check_weight


def unfold(W: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: the fibres along ``mode`` become columns, shape [W.shape[mode], -1]."""
    return W.movedim(mode, 0).reshape(W.shape[mode], -1)


def mode_product(W: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """``W ×_mode M``: multiply every mode-``mode`` fibre of ``W`` by ``M`` [J, W.shape[mode]]."""
    return torch.tensordot(M, W.movedim(mode, 0), dims=1).movedim(0, mode)


def tucker2_reconstruct(core: torch.Tensor, U_T: torch.Tensor, U_S: torch.Tensor) -> torch.Tensor:
    """``G ×₁ U_T ×₂ U_S``: core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS] → kernel [T, S, kh, kw]."""
    return mode_product(mode_product(core, U_T, 0), U_S, 1)


def hosvd(W: torch.Tensor, ranks):
    """Truncated higher-order SVD of the first two modes.

    ``ranks = (rT, rS)``. Returns ``(core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS])`` with
    orthonormal factors: the leading left singular vectors of the mode-0 and mode-1 unfoldings
    (by :func:`left_singular_vectors`, the eigenvectors of their small Gram matrices).
    """
    check_weight(W, 4)
    rT, rS = ranks
    rT = check_rank(rT, W.shape[0], "output rank")
    rS = check_rank(rS, W.shape[1], "input rank")
    U_T = left_singular_vectors(unfold(W, 0), rT)
    U_S = left_singular_vectors(unfold(W, 1), rS)
    core = mode_product(mode_product(W, U_T.T, 0), U_S.T, 1)
    return core, U_T, U_S


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` as a Python float (a layer's weight may be passed as it is)."""
    W, W_hat = W.detach(), W_hat.detach()
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W))


def left_singular_vectors(A: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``A`` [m, n], shape [m, rank].

    Computed from the smaller Gram matrix: the leading eigenvectors of ``A Aᵀ`` [m, m], or for a
    tall A (m > n ≥ rank) the orthonormalised ``A V`` with V those of ``Aᵀ A`` [n, n].
    For the wide unfoldings of a conv kernel this is several times faster than an SVD of ``A``.
    """
    if A.shape[0] > A.shape[1] >= rank:
        V = torch.linalg.eigh(A.T @ A).eigenvectors[:, -rank:].flip(-1)
        return torch.linalg.qr(A @ V).Q
    eigenvectors = torch.linalg.eigh(A @ A.T).eigenvectors  # eigenvalues ascending
    return eigenvectors[:, -rank:].flip(-1)


def hooi(W: torch.Tensor, ranks, n_iter: int = 50, tol: float = 1e-8):
    """Tucker-2 by higher-order orthogonal iteration (HOOI), started from the HOSVD.

    ``ranks = (rT, rS)``. Alternates U_T = leading left singular vectors of unfold(W ×₂ U_Sᵀ, 0)
    and U_S = those of unfold(W ×₁ U_Tᵀ, 1) (see :func:`left_singular_vectors`), then
    G = W ×₁ U_Tᵀ ×₂ U_Sᵀ. Each update maximises ‖G‖² over one factor, and with orthonormal
    factors ‖W − Ŵ‖² = ‖W‖² − ‖G‖²: the error never increases (in exact arithmetic) and needs no
    reconstruction. Stops after ``n_iter`` sweeps or when the relative error improves by less
    than ``tol``. Returns the best iterate ``(core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS])``,
    orthonormal factors: never worse than the HOSVD, which ``n_iter=0`` returns.

    Computed in ``W``'s dtype. In float32 the Gram matrices square the condition number, and the
    iteration can stall a few 1e-6 (in relative error) above the float64 optimum; pass
    ``W.double()`` when that last digit matters (benchmarks/results/tucker_hooi.md measures it).
    """
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")
    check_weight(W, 4)
    rT, rS = ranks
    rT = check_rank(rT, W.shape[0], "output rank")
    rS = check_rank(rS, W.shape[1], "input rank")
    norm2 = W.square().sum().clamp(min=torch.finfo(W.dtype).tiny)  # W = 0 stops after one sweep

    def relative_error_of(core):
        return float((1 - core.square().sum() / norm2).clamp(min=0).sqrt())

    core, U_T, U_S = hosvd(W, (rT, rS))
    error = relative_error_of(core)
    best = error, (core, U_T, U_S)
    for _ in range(int(n_iter)):
        U_T = left_singular_vectors(unfold(mode_product(W, U_S.T, 1), 0), rT)
        W_T = mode_product(W, U_T.T, 0)  # [rT, S, kh, kw]
        U_S = left_singular_vectors(unfold(W_T, 1), rS)
        core = mode_product(W_T, U_S.T, 1)
        new_error = relative_error_of(core)
        if new_error < best[0]:
            best = new_error, (core, U_T, U_S)
        improved, error = error - new_error, new_error
        if improved < tol:
            break
    return best[1]
