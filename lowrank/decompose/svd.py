"""Truncated SVD (Eckart–Young) and the two classic ways to see a conv kernel as a matrix."""
import torch


def check_weight(W: torch.Tensor, ndim: int) -> None:
    """Raise ``ValueError`` unless ``W`` has ``ndim`` dimensions and only finite entries."""
    if W.dim() != ndim:
        raise ValueError(f"expected a {ndim}-D weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("the weight holds NaN or infinite entries")


def check_rank(rank: int, full: int, what: str = "rank") -> int:
    """Return ``rank`` as an int if ``1 <= rank <= full``, else raise ``ValueError``."""
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"{what} must be an integer, got {rank!r}")
    if not 1 <= rank <= full:
        raise ValueError(f"{what} must be between 1 and {full}, got {rank}")
    return int(rank)


def truncated_svd(W: torch.Tensor, rank: int):
    """Best rank-``rank`` approximation of ``W`` [m, n].

    Returns ``(U [m, r], s [r], Vh [r, n])`` with ``U @ diag(s) @ Vh`` the Eckart–Young optimum.
    """
    check_weight(W, 2)
    rank = check_rank(rank, min(W.shape))
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :rank], s[:rank], Vh[:rank]


def truncation_error(s: torch.Tensor, rank: int) -> torch.Tensor:
    """Frobenius error ``sqrt(sum_{i>r} s_i^2)`` left by keeping ``rank`` of the singular values ``s``."""
    return s[rank:].square().sum().sqrt()


def break_even_rank(m: int, n: int) -> float:
    """Rank at which two factors ``r(m + n)`` cost as much as the dense ``m n`` matrix."""
    return m * n / (m + n)


def channel_matrix(W: torch.Tensor) -> torch.Tensor:
    """Conv weight [T, S, kh, kw] as the [T, S*kh*kw] matrix of the channel ("weight") SVD."""
    return W.reshape(W.shape[0], -1)


def spatial_matrix(W: torch.Tensor) -> torch.Tensor:
    """Conv weight [T, S, kh, kw] as the [S*kh, T*kw] matrix of the spatial SVD (Jaderberg et al.).

    Rows are indexed by (input channel, kernel row), columns by (output channel, kernel column).
    """
    T, S, kh, kw = W.shape
    return W.permute(1, 2, 0, 3).reshape(S * kh, T * kw)

