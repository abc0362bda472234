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
