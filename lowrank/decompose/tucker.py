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
    orthonormal factors: the leading left singular vectors of the mode-0 and mode-1 unfoldings.
    """
    check_weight(W, 4)
    rT, rS = ranks
    rT = check_rank(rT, W.shape[0], "output rank")
    rS = check_rank(rS, W.shape[1], "input rank")
    U_T = torch.linalg.svd(unfold(W, 0), full_matrices=False)[0][:, :rT]
    U_S = torch.linalg.svd(unfold(W, 1), full_matrices=False)[0][:, :rS]
    core = mode_product(mode_product(W, U_T.T, 0), U_S.T, 1)
    return core, U_T, U_S


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` as a Python float."""
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W))


def leading_eigenvectors(A: torch.Tensor, rank: int):
    """Leading left singular vectors of ``A`` [m, n] from the eigendecomposition of ``A Aᵀ`` [m, m].

    Returns ``(U [m, rank], energy)`` with ``energy = ‖Uᵀ A‖_F²``, the sum of the ``rank`` largest
    eigenvalues of ``A Aᵀ`` (the squared singular values kept).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(A @ A.T)  # ascending
    return eigenvectors[:, -rank:].flip(-1), eigenvalues[-rank:].sum()


def hooi(W: torch.Tensor, ranks, n_iter: int = 50, tol: float = 1e-8):
    """Tucker-2 by higher-order orthogonal iteration (HOOI), started from the HOSVD.

    ``ranks = (rT, rS)``. Alternates U_T = leading left singular vectors of unfold(W ×₂ U_Sᵀ, 0)
    and U_S = those of unfold(W ×₁ U_Tᵀ, 1), each from the eigendecomposition of a small Gram
    matrix. With orthonormal factors ‖W − Ŵ‖² = ‖W‖² − ‖G‖², so the error needs no reconstruction.
    Stops after ``n_iter`` sweeps or when the relative error improves by less than ``tol``.
    Returns ``(core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS])``, orthonormal factors.
    """
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")
    check_weight(W, 4)
    rT = check_rank(ranks[0], W.shape[0], "output rank")
    rS = check_rank(ranks[1], W.shape[1], "input rank")
    U_T, _ = leading_eigenvectors(unfold(W, 0), rT)  # the HOSVD start
    U_S, _ = leading_eigenvectors(unfold(W, 1), rS)
    norm2 = W.square().sum()
    kept = mode_product(mode_product(W, U_T.T, 0), U_S.T, 1).square().sum()
    error = float((norm2 - kept).clamp(min=0).div(norm2).sqrt())
    T, S = W.shape[:2]
    W_T = W.permute(0, 2, 3, 1).reshape(-1, S)  # [T·kh·kw, S]: rows (t, i, j), so W_T @ U_S = W ×₂ U_Sᵀ
    W_S = W.permute(1, 2, 3, 0).reshape(-1, T)  # [S·kh·kw, T]: rows (s, i, j), so W_S @ U_T = W ×₁ U_Tᵀ
    for _ in range(int(n_iter)):
        # unfold(W ×₂ U_Sᵀ, 0) and unfold(W ×₁ U_Tᵀ, 1) up to a permutation of columns
        U_T, _ = leading_eigenvectors((W_T @ U_S).reshape(T, -1), rT)
        U_S, kept = leading_eigenvectors((W_S @ U_T).reshape(S, -1), rS)
        new_error = float((norm2 - kept).clamp(min=0).div(norm2).sqrt())
        improved, error = error - new_error, new_error
        if improved < tol:
            break
    core = mode_product(mode_product(W, U_T.T, 0), U_S.T, 1)
    return core, U_T, U_S
