"""Rank rules: turn a layer (weights, method, input size) into the rank(s) of its factorization.

A rule is a callable ``rule(layer) -> rank`` on a :class:`lowrank.plans.Layer` (an int, or a pair
(rT, rS) for Tucker-2); a rule that needs every layer at once (a global budget) instead has
``allocate(layers) -> {name: rank}``.
"""
import math


def _clip(rank, full):
    if isinstance(full, tuple):
        return tuple(min(rank, f) for f in full)
    return rank if full is None else min(rank, full)


class fixed:
    """The same rank everywhere, clipped to each layer's full rank (for Tucker-2: rT = rS = r)."""

    def __init__(self, rank: int):
        if isinstance(rank, bool) or int(rank) != rank or rank < 1:
            raise ValueError(f"a rank must be a positive integer, got {rank!r}")
        self.rank = int(rank)

    def __call__(self, layer):
        return _clip(self.rank, layer.full_rank())

    def __repr__(self):
        return f"fixed({self.rank})"


def _scaled(full, k, top):
    """Ranks proportional to the full ranks: (T, S) scaled by k / top, at least 1 each."""
    if isinstance(full, tuple):
        return tuple(max(1, round(k * f / top)) for f in full)
    return k


class keep:
    """The largest rank whose factorization keeps at most ``fraction`` of the layer's parameters
    (for Tucker-2, both ranks scaled in proportion to the channel counts); at least rank 1."""

    def __init__(self, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def __call__(self, layer):
        full = layer.full_rank()
        budget = self.fraction * layer.dense_cost()[0]
        top = max(full) if isinstance(full, tuple) else (full or layer.module.weight.numel())
        lo, hi = 1, top  # largest k with cost(k) ≤ budget; cost grows with k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if layer.params(_scaled(full, mid, top)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return _scaled(full, lo, top)

    def __repr__(self):
        return f"keep({self.fraction})"


def resolve(ranks, layers) -> dict:
    """Rank of every layer (None: keep dense) from an int, a float, a dict or a rule."""
    if isinstance(ranks, dict):
        known = {layer.name for layer in layers}
        unknown = set(ranks) - known
        if unknown:
            raise ValueError(f"ranks given for layers not in the plan: {sorted(unknown)}")
        return {layer.name: ranks.get(layer.name) for layer in layers}
    if isinstance(ranks, bool):
        raise ValueError(f"ranks must be an int, a float in (0, 1], a dict or a rank rule, got {ranks!r}")
    if isinstance(ranks, int):
        ranks = fixed(ranks)
    elif isinstance(ranks, float):
        ranks = keep(ranks)
    if hasattr(ranks, "allocate"):
        return ranks.allocate(layers)
    if callable(ranks):
        return {layer.name: ranks(layer) for layer in layers}
    raise ValueError(f"ranks must be an int, a float in (0, 1], a dict or a rank rule, got {ranks!r}")


def _check_tau(tau):
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    return float(tau)


def _per_matrix(layer, choose):
    """Apply ``choose(singular values) -> rank`` to each of the layer's matrices (one, or two for Tucker-2)."""
    import torch

    ranks = tuple(max(1, choose(torch.linalg.svdvals(M.double()))) for M in layer.matrices())
    return ranks if len(ranks) > 1 else ranks[0]


def energy_rank(s, tau: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² ≥ τ Σ_i s_i² (ARSVD's energy rule); ``s`` sorted descending."""
    s = s.double()
    share = (s.square().cumsum(0) / s.square().sum()).tolist()
    return next(k + 1 for k, v in enumerate(share) if v >= tau - 1e-12)


def entropy_rank(s, tau: float) -> int:
    """Smallest k with −Σ_{i≤k} p_i log p_i ≥ τ H, p = s / Σ s (ARSVD's entropy rule)."""
    p = s.double() / s.sum()
    terms = -(p * p.clamp_min(1e-300).log())
    share = (terms.cumsum(0) / terms.sum()).tolist()
    return next(k + 1 for k, v in enumerate(share) if v >= tau - 1e-12)


class energy:
    """Per layer (per mode for Tucker-2), the smallest rank keeping a share ``tau`` of the squared
    singular values (Lala & Cherukuri 2025). Layers with fast-decaying spectra get small ranks."""

    def __init__(self, tau: float):
        self.tau = _check_tau(tau)

    def __call__(self, layer):
        return _per_matrix(layer, lambda s: energy_rank(s, self.tau))

    def __repr__(self):
        return f"energy({self.tau})"


class entropy:
    """Per layer (per mode for Tucker-2), the smallest rank whose spectral-entropy terms reach a
    share ``tau`` of the whole entropy (the entropy variant of ARSVD)."""

    def __init__(self, tau: float):
        self.tau = _check_tau(tau)

    def __call__(self, layer):
        return _per_matrix(layer, lambda s: entropy_rank(s, self.tau))

    def __repr__(self):
        return f"entropy({self.tau})"


class vbmf:
    """Per layer (per mode for Tucker-2), the rank EVBMF selects (Nakajima et al. 2013), as Kim et
    al. (2016) choose Tucker-2 ranks; a rank of 0 (pure noise) is raised to 1."""

    def __call__(self, layer):
        from .decompose.vbmf import evbmf

        ranks = tuple(max(1, evbmf(M.double()).rank) for M in layer.matrices())
        return ranks if len(ranks) > 1 else ranks[0]

    def __repr__(self):
        return "vbmf()"
