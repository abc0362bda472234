"""Data-informed factorization of one layer: the Σ-weighted decompositions of
:mod:`lowrank.decompose.weighted` turned into factorized layers (Kalle et al. 2025)."""
import torch.nn as nn

from .decompose.svd import channel_matrix
from .decompose.weighted import weighted_cp, weighted_svd, weighted_tucker2
from .layers import ChannelSVDConv2d, CPConv2d, LowRankLinear, Tucker2Conv2d


def factorize(dense: nn.Module, entry: dict, stats, **options) -> nn.Module:
    """The factorized layer for ``entry`` (a plan entry) minimising the output error on inputs with
    the statistics ``stats`` (a :class:`lowrank.stats.LayerStats`; its ``sigma`` is used).
    ``options`` go to the ALS of Tucker-2 and CP (``n_iter``, ``tol``)."""
    W = dense.weight.detach()
    d = W[0].numel()
    Sigma = stats.sigma
    if Sigma.shape != (d, d):
        raise ValueError(f"statistics of size {tuple(Sigma.shape)} do not fit a layer with {d} inputs per output")
    rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
    method = entry["method"]
    if isinstance(dense, nn.Linear):
        return LowRankLinear.from_factors(dense, *weighted_svd(W, Sigma, rank))
    if method == "svd":
        return ChannelSVDConv2d.from_factors(dense, *weighted_svd(channel_matrix(W), Sigma, rank))
    if method == "tucker2":
        core, U_T, U_S, _ = weighted_tucker2(W, Sigma, rank, **options)
        return Tucker2Conv2d.from_factors(dense, core, U_T, U_S)
    if method in ("cp", "cp3"):
        form = "4way" if method == "cp" else "3way"
        result = weighted_cp(W, Sigma, rank, form=form, **options)
        return CPConv2d.from_factors(dense, result.weights, result.factors, form)
    raise ValueError(f"method {method!r} has no data-informed version: its factors do not act on "
                     f"whole input patches (use 'svd', 'tucker2', 'cp' or 'cp3')")
