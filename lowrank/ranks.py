"""Rank rules: turn a layer (weights, method, input size) into the rank(s) of its factorization.

A rule is a callable ``rule(layer) -> rank`` on a :class:`lowrank.plans.Layer` (an int, or a pair
(rT, rS) for Tucker-2); a rule that needs every layer at once (a global budget) instead has
``allocate(layers) -> {name: rank}``.
"""


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
    """Smallest k with Σ_{i≤k} s_i² ≥ τ Σ_i s_i² (ARSVD's energy rule); ``s`` sorted descending.
    A zero matrix (all s_i = 0) gets rank 1, which represents it exactly."""
    s = s.double()
    if not s.any():
        return 1
    share = (s.square().cumsum(0) / s.square().sum()).tolist()
    return next(k + 1 for k, v in enumerate(share) if v >= tau - 1e-12)


def entropy_rank(s, tau: float) -> int:
    """Smallest k with −Σ_{i≤k} p_i log p_i ≥ τ H, p = s / Σ s (ARSVD's entropy rule); a zero
    matrix gets rank 1. A spectrum with one nonzero value has H = 0: rank 1."""
    if not s.any() or int((s > 0).sum()) == 1:
        return 1
    p = s.double() / s.sum()
    terms = -(p * p.clamp_min(1e-300).log())
    share = (terms.cumsum(0) / terms.sum()).tolist()
    return next(k + 1 for k, v in enumerate(share) if v >= tau - 1e-12)


class _SpectrumRule:
    """A rule that reads each matrix's singular values through ``rank_of(s, tau)``."""
    rank_of = None

    def __init__(self, tau: float):
        self.tau = _check_tau(tau)

    def __call__(self, layer):
        return _per_matrix(layer, lambda s: type(self).rank_of(s, self.tau))

    def __repr__(self):
        return f"{type(self).__name__}({self.tau})"


class energy(_SpectrumRule):
    """Per layer (per mode for Tucker-2), the smallest rank keeping a share ``tau`` of the squared
    singular values (Lala & Cherukuri 2025). Layers with fast-decaying spectra get small ranks."""
    rank_of = staticmethod(energy_rank)


class entropy(_SpectrumRule):
    """Per layer (per mode for Tucker-2), the smallest rank whose spectral-entropy terms reach a
    share ``tau`` of the whole entropy (the entropy variant of ARSVD)."""
    rank_of = staticmethod(entropy_rank)


class vbmf:
    """Per layer (per mode for Tucker-2), the rank EVBMF selects (Nakajima et al. 2013), as Kim et
    al. (2016) choose Tucker-2 ranks; a rank of 0 (pure noise) is raised to 1."""

    def __call__(self, layer):
        from .decompose.vbmf import evbmf

        ranks = tuple(max(1, evbmf(M.double()).rank) for M in layer.matrices())
        return ranks if len(ranks) > 1 else ranks[0]

    def __repr__(self):
        return "vbmf()"


def _singular_values(M):
    """Singular values of M [a, b], descending, from the eigenvalues of the smaller Gram matrix
    (in float64: several times faster than an SVD, and exact enough for shares of energy)."""
    import torch

    M = M.detach().double()
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def _gains(s, score: str) -> list:
    """Share of the layer's total score that each singular value adds: σ_i²/Σσ² (energy) or
    −p_i log p_i / H with p = σ/Σσ (entropy). ``s`` sorted descending; returns a list (all zero
    for a zero matrix, whose rank 1 is exact)."""
    s = s.double()
    if not s.any():
        return [0.0] * len(s)
    if score == "energy":
        terms = s.square()
    else:
        p = s / s.sum()
        terms = -(p * p.clamp_min(1e-300).log())
    if not terms.sum() > 0:   # entropy of a spectrum with one nonzero value: all in the first
        return [1.0] + [0.0] * (len(s) - 1)
    return (terms / terms.sum()).tolist()


class _Costs:
    """Cost of one layer at any rank, exact and cheap.

    The SVD layers cost c0 + c1·r (parameters and MACs are linear in r); Tucker-2 costs
    c0 + c1·(rT−1) + c2·(rS−1) + c3·(rT−1)(rS−1). Parameters and MACs come in closed form from
    the layer's shape and its dense MACs (spatial SVD's MACs from two probe builds).
    ``saves(rank)``: whether that rank saves parameters (the plan keeps the layer dense
    otherwise); calling the object gives what the budget counts (params or MACs).
    """

    def __init__(self, layer, by: str):
        full = layer.full_rank()
        self.tucker = isinstance(full, tuple)
        self.dense_params, self.coef = _params_form(layer)
        self.dense = self.dense_params
        self.macs = None
        if by == "macs":
            self.dense = layer.dense_cost()[1]
            self.macs = _macs_form(layer, self.dense)
            if self.macs is None:  # spatial SVD, CP: probe ranks 1 and 2 (their convs stride differently)
                one = layer.cost(1)[1]
                self.macs = (one, layer.cost(2)[1] - one if full is None or full >= 2 else 0)

    def _eval(self, coef, rank):
        if self.tucker:
            (a, b), (c, dT, dS, dTS) = rank, coef
            return c + dT * (a - 1) + dS * (b - 1) + dTS * (a - 1) * (b - 1)
        c, slope = coef
        return c + slope * (rank - 1)

    def params(self, rank) -> int:
        return self._eval(self.coef, rank)

    def saves(self, rank) -> bool:
        return self.params(rank) < self.dense_params

    def __call__(self, rank) -> int:
        """What the budget counts for the layer at ``rank``: the dense cost if that rank saves nothing."""
        if not self.saves(rank):
            return self.dense
        return self._eval(self.macs or self.coef, rank)


def _macs_form(layer, dense_macs):
    """MACs coefficients in the form of :class:`_Costs` (None for spatial SVD and CP).

    With P output positions (dense MACs / weight entries) and a matrix [a, b]: r(a + b)·P for the
    SVDs; Tucker-2 on an input of H·W positions: S·rS·H·W + rS·rT·kh·kw·P + rT·T·P.
    """
    m = layer.module
    P = dense_macs // m.weight.numel()
    if layer.type == "Linear" or layer.method == "svd":
        a, b = m.weight.shape[0], m.weight[0].numel()
        return (a + b) * P, (a + b) * P
    if layer.method == "tucker2":
        T, S, kh, kw = m.weight.shape
        HW, k = layer.input_size[-1] * layer.input_size[-2], kh * kw
        return (S * HW + k * P + T * P, k * P + T * P, S * HW + k * P, k * P)
    return None


def _params_form(layer):
    """(dense parameters, coefficients of the factorized parameters in the form of :class:`_Costs`).

    Linear / channel SVD: r(a + b) (+ bias) for a matrix [a, b]; spatial SVD: r(S·kh + T·kw);
    Tucker-2: S·rS + rS·rT·kh·kw + rT·T; CP: R(S + kh + kw + T), 3-way R(S + kh·kw + T). Checked
    against :meth:`lowrank.plans.Layer.params` in the tests.
    """
    m = layer.module
    bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
    dense = m.weight.numel() + bias
    if layer.type == "Linear" or layer.method == "svd":
        a, b = m.weight.shape[0], m.weight[0].numel()
        return dense, (a + b + bias, a + b)
    T, S, kh, kw = m.weight.shape
    if layer.method == "spatial":
        return dense, (S * kh + T * kw + bias, S * kh + T * kw)
    if layer.method == "tucker2":  # S rS + rS rT kh kw + rT T at (1 + x, 1 + y)
        k = kh * kw
        return dense, (S + k + T + bias, k + T, S + k, k)
    if layer.method in ("cp", "cp3"):  # R (S + kh + kw + T) or R (S + kh kw + T)
        per_rank = S + T + (kh + kw if layer.method == "cp" else kh * kw)
        return dense, (per_rank + bias, per_rank)
    raise ValueError(f"{layer.name}: method {layer.method!r} has no spectrum to allocate ranks by")


def check_budget(costs, fraction: float, by: str, target: float):
    """``ValueError`` saying the smallest possible fraction when rank 1 everywhere (a list of
    :class:`_Costs`) costs more than ``target`` = ``fraction`` of the layers' dense ``by``."""
    least = sum(c((1, 1) if c.tucker else 1) for c in costs)
    if least > target:
        total = sum(c.dense for c in costs)
        raise ValueError(f"a budget of {fraction:.4g} of the {by} is below the minimum: rank 1 "
                         f"everywhere keeps {least / total:.4f} ({least:,} of {total:,} {by})")


class budget:
    """Ranks for every layer at once so that the factorized layers cost ``fraction`` of the
    selected layers' dense parameters (``by="params"``) or MACs (``by="macs"``).

    ``method="greedy"`` (default): start every layer at rank 1 — (1, 1) for Tucker-2 — and
    repeatedly take the rank step with the largest gain per unit cost, while it fits the budget.
    The gain of a step is the *relative* score it adds to its layer: σ_{r+1}² / Σ_i σ_i² for
    ``score="energy"`` (the entropy term's share for ``score="entropy"``), so that every layer
    counts the same whatever the scale of its weights and the objective is the sum over layers of
    the share of energy each keeps. A Tucker-2 layer grows either mode; its score is
    e_T(rT) + e_S(rS) − 1, the lower bound on the energy Tucker-2 keeps (HOSVD error bound). A step
    to a rank that saves no parameters makes the layer dense (score 1, dense cost), as the plan does.
    The result costs at most the budget and less than one rank step below it.

    ``method="bisect"``: one threshold τ for every layer, ARSVD's ``energy(τ)`` rule, the largest
    τ (by bisection) whose ranks fit the budget.

    ``stats`` (from :func:`lowrank.calibrate`; channel SVD and linear layers): the data-informed
    allocation. Each layer's spectrum is that of W L, Σ + δI = L Lᵀ with the ridge δ of
    :func:`lowrank.compress` (1e-3): the singular values whose squares the Σ-weighted SVD of
    ``compress(model, plan, stats)`` drops, so the gains are the shares of output error.

    Raises ``ValueError`` when even rank 1 everywhere exceeds the budget (the message says the
    smallest possible fraction).

    ``by="latency"``: the budget is ``fraction`` of the whole dense model's time measured on this
    machine, and ``table`` (:func:`lowrank.deploy.latency_table`) holds the measured seconds of each
    layer, dense and at its candidate ranks. The predicted time of the model is the table's
    dense network time plus (scaled by ``table.scale``) what the chosen ranks change in the layers'
    times.
    Each layer chooses one of its options (dense, score 1, or a measured rank) — a multiple-choice
    knapsack — greedily: every layer starts at its fastest option, then the step with the largest
    score gained per measured second is taken while it fits, along each layer's efficient options
    (the upper convex hull of score against time: an option slower than another with no more score
    is never taken, so a layer whose factorized forms are slower than dense at every rank stays
    dense), and the time left is filled by the best single changes that fit. Layers kept dense get
    rank ``None`` and a note in ``self.notes``; ``self.predicted`` is the predicted time.
    """

    def __init__(self, fraction: float, by: str = "params", score: str = "energy", method: str = "greedy",
                 stats=None, table=None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if by not in ("params", "macs", "latency"):
            raise ValueError(f"by must be 'params', 'macs' or 'latency', got {by!r}")
        if score not in ("energy", "entropy"):
            raise ValueError(f"score must be 'energy' or 'entropy', got {score!r}")
        if method not in ("greedy", "bisect"):
            raise ValueError(f"method must be 'greedy' or 'bisect', got {method!r}")
        if by == "latency" and table is None:
            raise ValueError("by='latency' needs the layers' measured times: table=lowrank.deploy.latency_table("
                             "model, plan, lowrank.deploy.LayerTimes(...))")
        if by == "latency" and method != "greedy":
            raise ValueError("by='latency' allocates greedily: method='greedy'")
        if by != "latency" and table is not None:
            raise ValueError("a latency table is only used with by='latency'")
        self.fraction, self.by, self.score, self.method, self.table = float(fraction), by, score, method, table
        self.stats = stats
        self.notes, self.predicted = {}, None

    def __repr__(self):
        data = ", stats=…" if self.stats is not None else ""
        return f"budget({self.fraction}, by={self.by!r}, score={self.score!r}, method={self.method!r}{data})"

    def _matrices(self, layer):
        if self.stats is None:
            return layer.matrices()
        from .decompose.weighted import ridged, whitening

        if not (layer.type == "Linear" or layer.method == "svd"):
            raise ValueError(f"{layer.name}: a data-informed budget (stats=...) allocates channel SVD ranks; "
                             f"{layer.method!r} layers have no Σ-whitened spectrum")
        if layer.name not in self.stats:
            raise ValueError(f"{layer.name}: the stats have no entry for this layer: calibrate with "
                             f"lowrank.calibrate(model, data, plan)")
        return [whitening(ridged(self.stats[layer.name].sigma)).whiten(layer.matrices()[0].double())]

    def allocate(self, layers) -> dict:
        """{layer name: rank} meeting the budget (see the class docstring)."""
        for layer in layers:
            if layer.full_rank() is None:
                raise ValueError(f"{layer.name}: method {layer.method!r} has no spectrum to allocate ranks by")
        gains = [[_gains(_singular_values(M), self.score) for M in self._matrices(layer)] for layer in layers]
        if self.by == "latency":
            return self._latency(layers, gains)
        costs = [_Costs(layer, self.by) for layer in layers]
        target = self.fraction * sum(c.dense for c in costs)
        start = [(1, 1) if c.tucker else 1 for c in costs]
        check_budget(costs, self.fraction, self.by, target)
        choose = self._greedy if self.method == "greedy" else self._bisect
        ranks = choose(layers, gains, costs, start, target)
        return {layer.name: r for layer, r in zip(layers, ranks)}

    def _greedy(self, layers, gains, costs, start, target):
        import heapq

        ranks, dense = list(start), [False] * len(layers)
        spent = sum(c(r) for c, r in zip(costs, ranks))
        heap = []

        def push(i):
            """Queue every possible next step of layer i as (−gain per cost, i, mode, new rank)."""
            if dense[i]:
                return
            c, r, g = costs[i], ranks[i], gains[i]
            here = sum(sum(gm[:k]) for gm, k in zip(g, r if c.tucker else (r,)))
            for mode in range(len(g)):
                k = r[mode] if c.tucker else r
                if k >= len(g[mode]):
                    continue
                new = tuple(k + 1 if m == mode else v for m, v in enumerate(r)) if c.tucker else k + 1
                gain = (len(g) - here) if not c.saves(new) else g[mode][k]  # dense: score 1 per mode
                if gain <= 0:
                    continue   # nothing to gain (a zero matrix, or singular values that are zero)
                step = c(new) - c(r)
                heapq.heappush(heap, (-gain / max(step, 1e-12), i, mode, r, new, step))

        for i in range(len(layers)):
            push(i)
        while heap:
            _, i, mode, old, new, step = heapq.heappop(heap)
            if dense[i] or ranks[i] != old:
                continue  # stale: the layer moved since this step was queued
            if spent + step > target:
                continue  # does not fit; smaller steps of other layers may
            spent += step
            if costs[i].saves(new):
                ranks[i] = new
            else:
                dense[i] = True
                ranks[i] = tuple(len(g) for g in gains[i]) if costs[i].tucker else len(gains[i][0])
            push(i)
        return ranks

    def _latency(self, layers, gains) -> dict:
        """The ``by="latency"`` allocation (see the class docstring)."""
        import heapq

        table, options, dense_total = self.table, [], 0.0
        for layer, g in zip(layers, gains):
            dense, ranks = table.options(layer.name, layer.method)
            dense_total += dense
            score = lambda r: sum(sum(gm[:k]) for gm, k in zip(g, r if isinstance(r, tuple) else (r,))) - len(g) + 1
            options.append([(dense, 1.0, None)] + [(s, score(r), r) for r, s in ranks.items()])
        # predicted time: network + scale·(spent − dense_total) ≤ fraction·network
        predict = lambda spent: table.network + table.scale * (spent - dense_total)
        target = dense_total - (1 - self.fraction) * table.network / table.scale
        hulls = [_hull(o) for o in options]
        spent = sum(h[0][0] for h in hulls)
        if spent > target:
            raise ValueError(f"a latency budget of {self.fraction:.4g} is below the minimum: the fastest option of "
                             f"every layer gives {predict(spent) / table.network:.4f} of the dense time")
        at = [0] * len(layers)
        heap = []

        def push(i):
            h = hulls[i]
            if at[i] + 1 < len(h):
                (s0, v0, _), (s1, v1, _) = h[at[i]], h[at[i] + 1]
                heapq.heappush(heap, (-(v1 - v0) / (s1 - s0), i, at[i]))

        for i in range(len(layers)):
            push(i)
        while heap:
            _, i, j = heapq.heappop(heap)
            step = hulls[i][j + 1][0] - hulls[i][j][0]
            if spent + step <= target:
                spent += step
                at[i] = j + 1
                push(i)
        chosen = [h[k] for h, k in zip(hulls, at)]
        while True:   # fill the time left with the best single change that fits
            best = None
            for i, o in enumerate(options):
                for option in o:
                    gain, extra = option[1] - chosen[i][1], option[0] - chosen[i][0]
                    if gain > 1e-12 and spent + extra <= target and (best is None or gain > best[0]):
                        best = (gain, i, option, extra)
            if best is None:
                break
            _, i, option, extra = best
            chosen[i], spent = option, spent + extra
        self.predicted, self.notes = predict(spent), {}
        for layer, option, o in zip(layers, chosen, options):
            if option[2] is None:
                fastest = min(s for s, _, r in o if r is not None) if len(o) > 1 else float("inf")
                why = (f"slower factorized at every measured rank (fastest {fastest * 1e3:.3g} ms, dense "
                       f"{option[0] * 1e3:.3g} ms)" if fastest >= option[0] else "the latency budget allows it")
                self.notes[layer.name] = f"kept dense by the rank rule: {why}"
        return {layer.name: option[2] for layer, option in zip(layers, chosen)}

    def _bisect(self, layers, gains, costs, start, target):
        def ranks_at(tau):
            rs = []
            for c, g in zip(costs, gains):
                r = tuple(_first_reaching(gm, tau) for gm in g)
                rs.append(r if c.tucker else r[0])
            return rs

        spend = lambda rs: sum(c(r) for c, r in zip(costs, rs))
        lo, hi = 0.0, 1.0
        if spend(ranks_at(hi)) <= target:
            return ranks_at(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spend(ranks_at(mid)) <= target else (lo, mid)
        return ranks_at(lo) if lo > 0 else list(start)


def _hull(options: list) -> list:
    """The efficient options of one layer, as (seconds, score, rank) by increasing time: the
    upper convex hull of score against time, from the fastest option on (an option is dropped if
    another is no slower and scores at least as much, or if it lies under a line between two)."""
    front = []
    for o in sorted(options, key=lambda o: (o[0], -o[1])):
        if front and o[1] <= front[-1][1]:
            continue   # slower, and no better
        while len(front) >= 2:
            (s0, v0, _), (s1, v1, _) = front[-2], front[-1]
            if (v1 - v0) * (o[0] - s1) <= (o[1] - v1) * (s1 - s0):
                front.pop()   # front[-1] lies under the line from front[-2] to o
            else:
                break
        front.append(o)
    return front


def _first_reaching(shares: list, tau: float) -> int:
    """Smallest k ≥ 1 with shares[0] + … + shares[k−1] ≥ τ (shares sum to 1; all zero: 1)."""
    if not any(shares):
        return 1
    total = 0.0
    for k, v in enumerate(shares):
        total += v
        if total >= tau - 1e-12:
            return k + 1
    return len(shares)
