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
