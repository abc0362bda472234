"""Data-informed factorization of one layer: the Σ-weighted decompositions of
:mod:`lowrank.decompose.weighted` turned into factorized layers (Kalle et al. 2025)."""
import torch
import torch.nn as nn

from .decompose.svd import channel_matrix
from .decompose.weighted import weighted_cp, weighted_svd, weighted_tucker2
from .layers import ChannelSVDConv2d, CPConv2d, LowRankLinear, Tucker2Conv2d


def factorize(dense: nn.Module, entry: dict, sigma: torch.Tensor, weight: torch.Tensor | None = None,
              **options) -> nn.Module:
    """The factorized layer for ``entry`` (a plan entry) minimising ``‖(W − W̃) Σ^{1/2}‖_F``, the
    output error on inputs with second moment ``sigma`` = Σ [d, d] (e.g. ``LayerStats.sigma``).

    ``W`` is ``weight`` if given (same shape as the dense weight), else ``dense.weight``; the new
    layer takes its configuration and bias from ``dense``. ``options`` go to the ALS of Tucker-2
    and CP (``n_iter``, ``tol``).
    """
    W = (dense.weight if weight is None else weight).detach()
    if W.shape != dense.weight.shape:
        raise ValueError(f"weight {tuple(W.shape)} does not have the layer's shape {tuple(dense.weight.shape)}")
    d = W[0].numel()
    if sigma.shape != (d, d):
        raise ValueError(f"statistics of size {tuple(sigma.shape)} do not fit a layer with {d} inputs per output")
    rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
    method = entry["method"]
    if isinstance(dense, nn.Linear):
        return LowRankLinear.from_factors(dense, *weighted_svd(W, sigma, rank))
    if method == "svd":
        return ChannelSVDConv2d.from_factors(dense, *weighted_svd(channel_matrix(W), sigma, rank))
    if method == "tucker2":
        core, U_T, U_S, _ = weighted_tucker2(W, sigma, rank, **options)
        return Tucker2Conv2d.from_factors(dense, core, U_T, U_S)
    if method in ("cp", "cp3"):
        form = "4way" if method == "cp" else "3way"
        result = weighted_cp(W, sigma, rank, form=form, **options)
        return CPConv2d.from_factors(dense, result.weights, result.factors, form)
    raise ValueError(f"method {method!r} has no data-informed version: its factors do not act on "
                     f"whole input patches (use 'svd', 'tucker2', 'cp' or 'cp3')")
