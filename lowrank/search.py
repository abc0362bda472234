"""Continuous rank search: each layer's rank a continuous variable, learnt by gradient under an
exact parameter or MAC budget.

Every planned layer is factored ONCE at full rank so that "rank r" means "the first r
components" (:class:`Nested`): the channel or spatial SVD (the Σ-weighted SVD with
``norm="data"``), the HOSVD for Tucker-2 (two ranks), or the terms of one high-rank CP sorted by
weight. A continuous rank ρ becomes the soft mask m_k = sigmoid((ρ + ½ − k)/τ) ≈ P(rank ≥ k) over
the components, so the masked layer is still one layer, and a hard mask is exactly a truncated
decomposition.

:func:`search` minimises over the ρ of all layers
- without data: the sum over layers of the relative reconstruction error ‖W − W(m)‖²/‖W‖² (in
  the Σ-norm with ``norm="data"``). For orthogonal nested factors this is Σ_k (1 − m_k)² e_k,
  e_k the share of the layer's energy in component k: under a budget, a knapsack that the
  greedy allocator :class:`lowrank.ranks.budget` solves, and the search finds its ranks;
- with ``data``: starting from the data-free optimum, the distillation loss T²·KL(teacher ‖
  student) of the masked network against the dense one on the images (no labels), BatchNorm on
  each batch's statistics (as if re-estimated, not the dense network's frozen ones).
Each step is Adam's, and is followed by a projection onto the budget in Adam's metric,
ρ ← clip(ρ̃ − ν P ∇C(ρ̃), 1, R) with ν such that the continuous cost Σ_i C_i(ρ_i) is the budget
(so a fixed point is a KKT point); τ is annealed, and the last steps run the hard masks forward
(straight-through). The continuous ranks are then rounded down, which fits, and the rest of the
budget is spent by the greedy allocator's steps, exact costs, largest decrease of the search's
loss per unit of cost first (measured on the hard-masked network: reconstruction errors without
data, the distillation loss on 256 of the images with). The result costs at most the budget and
less than one rank step below it.
"""
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import trange

from . import ranks as rules
from .decompose.cp import conv_cp, cp_reconstruct
from .decompose.svd import channel_matrix, spatial_matrix
from .decompose.tucker import left_singular_vectors, mode_product, unfold
from .decompose.weighted import ridged, weighted_svd
from .measure import _as_input, _eval
from .plans import METHODS, plan as make_plan


#: CP-ALS sweeps of the one high-rank CP whose terms the search orders
CP_SWEEPS = 100


class Nested:
    """One layer (a :class:`lowrank.plans.Layer`) factored once at full rank into components
    ordered by importance, so that its first r components are its rank-r decomposition.

    ``full``: the number of components per rank variable, (R,) or (T, S) for Tucker-2.
    :meth:`weight` builds the layer's weight from masks over the components (one mask [R] per
    variable): ones give back the full factorization, a hard mask (ones then zeros) the
    truncated one that :func:`lowrank.compress` builds at that rank (for Tucker-2 with
    ``n_iter=0``, the HOSVD; CP is re-fitted at the chosen rank). ``sigma``: Σ of a data-informed
    plan: errors are measured in the Σ-norm, and the channel SVD's nested factors are the
    Σ-weighted SVD's (A = U, B = Uᵀ W, U the left singular vectors of W L; the other methods keep
    their plain nested factors). ``cp_rank``: the rank of the one CP whose terms are searched
    (default: the largest that saves parameters; :data:`CP_SWEEPS` sweeps of CP-ALS). All factors
    in float64.
    """

    def __init__(self, layer, sigma=None, cp_rank=None):
        self.name, self.method = layer.name, layer.method
        W = layer.module.weight.detach().double()
        self.shape = W.shape
        self.sigma = None if sigma is None else sigma.to(W)
        if layer.type == "Linear" or layer.method == "svd":
            M = channel_matrix(W) if W.dim() == 4 else W
            if sigma is None:
                U, s, Vh = torch.linalg.svd(M, full_matrices=False)
                self.factors = (U * s, Vh)
            else:
                self.factors = weighted_svd(M, self.sigma, min(M.shape))
        elif layer.method == "spatial":
            U, s, Vh = torch.linalg.svd(spatial_matrix(W), full_matrices=False)
            self.factors = (U * s, Vh)
        elif layer.method == "tucker2":
            T, S = W.shape[:2]
            U_T, U_S = left_singular_vectors(unfold(W, 0), T), left_singular_vectors(unfold(W, 1), S)
            self.factors = (mode_product(mode_product(W, U_T.T, 0), U_S.T, 1), U_T, U_S)
        elif layer.method in ("cp", "cp3"):
            T, S, kh, kw = W.shape
            form = "4way" if layer.method == "cp" else "3way"
            per_rank = T + S + (kh + kw if form == "4way" else kh * kw)
            rank = cp_rank or max(1, (W.numel() - 1) // per_rank)
            result = conv_cp(W, rank, form=form, n_iter_max=CP_SWEEPS)
            order = result.weights.abs().argsort(descending=True)
            self.factors = (result.weights[order], [A[:, order] for A in result.factors])
        else:
            raise ValueError(f"{layer.name}: the search does not support method {layer.method!r}")
        if self.method == "tucker2":
            self.full = (self.factors[1].shape[1], self.factors[2].shape[1])
        else:
            self.full = (len(self.factors[0]) if self.method in ("cp", "cp3") else len(self.factors[1]),)
        self.norm2 = float(self._sigma_norm2(W))
        self.dense = W

    def hard(self, rank) -> list:
        """The hard masks (ones for the first r components) of ``rank`` (an int, a pair for Tucker-2)."""
        rank = rank if isinstance(rank, (tuple, list)) else (rank,)
        return [(torch.arange(1, R + 1, device=self.dense.device) <= r).double() for r, R in zip(rank, self.full)]

    def _sigma_norm2(self, E):
        if self.sigma is None:
            return E.square().sum()
        E2 = E.reshape(E.shape[0], -1)
        return ((E2 @ self.sigma) * E2).sum()

    def weight(self, masks) -> torch.Tensor:
        """The layer's weight [T, S, kh, kw] (or [m, n]) with component k of variable v scaled
        by ``masks[v][k]`` (float64, differentiable in the masks)."""
        masks = [m.to(self.dense.device) for m in masks]
        if self.method == "tucker2":
            core, U_T, U_S = self.factors
            return mode_product(mode_product(core, U_T * masks[0], 0), U_S * masks[1], 1)
        if self.method in ("cp", "cp3"):
            weights, factors = self.factors
            return cp_reconstruct(weights * masks[0], factors).reshape(self.shape)
        A, B = self.factors
        M = (A * masks[0]) @ B
        if self.method == "spatial":
            T, S, kh, kw = self.shape
            return M.reshape(S, kh, T, kw).permute(2, 0, 1, 3)
        return M.reshape(self.shape)

    def error(self, masks) -> torch.Tensor:
        """Relative squared reconstruction error ‖W − W(m)‖²/‖W‖² (Σ-norm if the layer has Σ)."""
        return self._sigma_norm2(self.dense - self.weight(masks)) / self.norm2


def soft_masks(rho, full, tau: float):
    """The masks m_k = sigmoid((ρ + ½ − k)/τ), k = 1..R, of each rank variable (τ = 0: the hard
    mask 1[k ≤ round(ρ)])."""
    out = []
    for r, R in zip(rho, full):
        k = torch.arange(1, R + 1, dtype=r.dtype, device=r.device)
        out.append((k <= torch.round(r)).to(r.dtype) if tau == 0 else torch.sigmoid((r + 0.5 - k) / tau))
    return out


def masked_model(model, nested: dict, ranks: dict) -> nn.Module:
    """A copy of ``model`` whose layers named in ``nested`` have the weight of their first
    ``ranks[name]`` components (a dense layer: the truncated decomposition as one weight)."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, n in nested.items():
            weight = new.get_submodule(name).weight
            weight.copy_(n.weight(n.hard(ranks[name])).to(weight))
    return new


@dataclass
class Trajectory:
    """What the search did, one entry per step: ``loss``, ``tau``, and ``ranks`` name → list of
    continuous ranks (pairs for Tucker-2). The steps from ``data_from`` on (None: none) are
    those with data; the ones before, the data-free search that starts them."""
    loss: list = field(default_factory=list)
    tau: list = field(default_factory=list)
    ranks: dict = field(default_factory=dict)
    data_from: int | None = None


@dataclass
class Search:
    """The result of :func:`search`: the ``plan`` at the discretised ``ranks`` (name → rank),
    the ``trajectory``, the ``cost`` of the searched layers (discretised, in ``by`` units), the
    ``target`` budget in the same units, the wall-clock ``seconds``, and the ``nested`` factors
    (name → :class:`Nested`) of the ``model`` searched."""
    plan: object
    ranks: dict
    trajectory: Trajectory
    cost: int
    target: float
    by: str
    seconds: float
    nested: dict = field(repr=False, default_factory=dict)
    model: nn.Module = field(repr=False, default=None)

    def masked(self, ranks: dict | None = None) -> nn.Module:
        """A copy of the model searched with each searched layer's weight at the hard mask of
        ``ranks`` (default: the ranks found), as one dense weight: for channel and spatial SVD
        and Tucker-2 the network :func:`lowrank.compress` builds from the plan (Tucker-2 with
        ``n_iter=0``), computed in float64 and stored in the model's dtype."""
        return masked_model(self.model, self.nested, self.ranks if ranks is None else ranks)

    def __repr__(self):
        return (f"Search({len(self.ranks)} layers, {self.by} {self.cost:,} of a budget of {self.target:,.0f}, "
                f"{len(self.trajectory.loss)} steps in {self.seconds:.1f} s)")


def _layer_rank(costs, rho):
    return tuple(rho) if costs.tucker else rho[0]


class _Budget:
    """The continuous cost of all layers as a function of the rank fractions u = ρ/R: the linear
    (SVD, CP) or bilinear (Tucker-2) forms of :class:`lowrank.ranks._Costs`, extended beyond the
    ranks that save anything, vectorised over the layers."""

    def __init__(self, costs, layers_of, full):
        self.R = torch.tensor(full, dtype=torch.float64)
        self.a = torch.tensor([vs[0] for vs in layers_of])
        self.b = torch.tensor([vs[1] if len(vs) > 1 else -1 for vs in layers_of])
        coef = [c.macs or c.coef for c in costs]
        coef = [k if c.tucker else (k[0], k[1], 0, 0) for c, k in zip(costs, coef)]
        self.c0, self.dA, self.dB, self.dAB = torch.tensor(coef, dtype=torch.float64).T

    def _ab(self, u):
        """(ρ_a − 1, ρ_b − 1) of every layer for rank fractions u [..., n] (ρ_b = 1 for one rank)."""
        rho = u * self.R
        b = torch.where(self.b >= 0, rho[..., self.b.clamp(min=0)], torch.ones_like(self.c0))
        return rho[..., self.a] - 1, b - 1

    def __call__(self, u) -> torch.Tensor:
        """The cost of all layers at u [..., n]: a tensor [...]."""
        a, b = self._ab(u)
        return (self.c0 + self.dA * a + self.dB * b + self.dAB * a * b).sum(-1)

    def gradient(self, u) -> torch.Tensor:
        a, b = self._ab(u)
        g = torch.zeros_like(u)
        g.index_add_(0, self.a, self.dA + self.dAB * b)
        tucker = self.b >= 0
        g.index_add_(0, self.b[tucker], (self.dB + self.dAB * a)[tucker])
        return g * self.R

    def project(self, u, target, metric=None):
        """Projection onto {cost = target, 1/R ≤ u ≤ 1} in the metric diag(1/``metric``), the
        costs linearised at ``u``: u − ν·metric·∇C, ν found on grids of 32 values each (the cost
        decreases in ν), to at most ``target``. With the metric of the gradient step, a fixed
        point is a KKT point of the search."""
        step = self.gradient(u) * (1 if metric is None else metric)
        at = lambda nu: torch.minimum(torch.maximum(u - nu[..., None] * step, 1 / self.R), torch.ones_like(u))
        lo, hi = torch.tensor(-1.0, dtype=u.dtype), torch.tensor(1.0, dtype=u.dtype)
        while self(at(lo)) < target and lo > -1e15:
            lo = lo * 2
        while self(at(hi)) > target and hi < 1e15:
            hi = hi * 2
        for _ in range(8):
            grid = torch.linspace(float(lo), float(hi), 33, dtype=u.dtype)
            fits = int((self(at(grid)) > target).sum())     # the first `fits` values spend too much
            lo, hi = grid[max(fits - 1, 0)], grid[min(fits, 32)]
        return at(hi)


#: rank steps below the rounded-down continuous ranks from which the discretisation's greedy
#: steps start (so that a search not quite converged does not fix a step the greedy would not take)
SLACK = 1


def _discretise(rho, full, layers_of, costs, target, gain):
    """Integer ranks from the continuous ones: every rank rounded down and lowered by
    :data:`SLACK` (which fits the budget, as the continuous ranks meet it), then the greedy
    allocator's steps with exact costs: take the rank step with the largest ``gain(layer, old
    rank, new rank, ranks)`` per unit of cost while it fits, a step to a rank that saves nothing
    making the layer dense (full rank). Steps that gain nothing (a measured loss is noisy) come
    last, the least harmful first, so that the result costs at most ``target`` and less than one
    rank step below it."""
    import heapq

    r = [min(max(int(math.floor(x + 1e-9)) - SLACK, 1), R) for x, R in zip(rho, full)]
    rank = lambda i: _layer_rank(costs[i], [r[v] for v in layers_of[i]])
    total = sum(c(rank(i)) for i, c in enumerate(costs))
    heap = []

    def push(i):
        c, old = costs[i], rank(i)
        if not c.saves(old):
            return   # dense already
        for v in layers_of[i]:
            if r[v] >= full[v]:
                continue
            r[v] += 1
            new = rank(i) if c.saves(rank(i)) else _layer_rank(c, [full[w] for w in layers_of[i]])
            r[v] -= 1
            g, step = gain(i, old, new, r), c(new) - c(old)
            heapq.heappush(heap, (g <= 0, -g / max(step, 1e-12), v, i, old, new, step))

    for i in range(len(costs)):
        push(i)
    while heap:
        _, _, v, i, old, new, step = heapq.heappop(heap)
        if rank(i) != old or total + step > target:
            continue   # stale (the layer moved since), or does not fit: smaller steps may
        total += step
        for w, k in zip(layers_of[i], new if isinstance(new, tuple) else (new,)):
            r[w] = k
        push(i)
    return r, total


def _evaluator(model, student, nested, layers_of, data, temperature, batch_size, images=256):
    """``loss(r, i, rank)``: the distillation loss of the hard-masked network at ranks ``r`` with
    layer ``i`` at ``rank``, on the first ``images`` of ``data`` (fixed, BatchNorm on their
    statistics), cached by ranks."""
    from .stats import _batches

    xs = [_as_input(x, model) for x in _batches(data, batch_size, images)]
    with torch.no_grad(), _eval(model):
        teachers = [model(x) for x in xs]
    dtype = next(model.parameters()).dtype
    cache, weights = {}, {}

    def weight(i, rank):
        key = (i, rank)
        if key not in weights:
            weights[key] = nested[i].weight(nested[i].hard(rank)).to(dtype)
        return weights[key]

    def loss(r, i, rank):
        ranks = [tuple(r[v] for v in vs) for vs in layers_of]
        ranks[i] = rank if isinstance(rank, tuple) else (rank,)
        key = tuple(ranks)
        if key not in cache:
            w = {f"{n.name}.weight": weight(j, k if len(k) > 1 else k[0])
                 for j, (n, k) in enumerate(zip(nested, ranks))}
            total = 0.0
            with torch.no_grad():
                for x, t in zip(xs, teachers):
                    total += float(_distillation(functional_call(student, w, (x,)), t, temperature)) * len(x)
            cache[key] = total / sum(len(x) for x in xs)
        return cache[key]

    return loss


def _distillation(student, teacher, temperature):
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), the mean over the batch."""
    T = temperature
    return T ** 2 * F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1),
                             reduction="batchmean", log_target=True)


def _loader(data, batch_size, generator):
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                                       drop_last=len(data) > batch_size)


def _cycle(loader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        if empty:
            raise ValueError("the data are empty")


def search(model, method: str = "svd", budget: float = 0.5, data=None, *, by: str = "params",
           include=None, exclude=None, norm: str = "frobenius", stats=None, steps: int = 150,
           batch_size: int = 64, lr: float = 0.02, tau=(1.0, 0.1), temperature: float = 4.0,
           straight_through: float = 0.8, seed: int = 0, cp_rank=None, input_size=(3, 32, 32),
           progress: bool = True) -> Search:
    """Search every planned layer's rank by gradient so that the layers cost ``budget`` of their
    dense parameters (``by="params"``) or MACs (``by="macs"``); returns a :class:`Search` whose
    ``plan`` (from :func:`lowrank.plan` with ``method``, ``include``, ``exclude``, ``norm``) is
    compressed as usual. See the module docstring for the method.

    ``data``: images to distil on (a Dataset of (x, y) pairs — labels unused —, a DataLoader or a
    tensor [N, ...]; pass augmented training images, as for :func:`lowrank.recalibrate_bn`), or
    ``None`` for the data-free search. ``norm="data"``: pass ``stats`` from
    :func:`lowrank.calibrate`; errors are measured in the Σ-norm (Σ with the ridge of
    :func:`lowrank.compress`, 1e-3) and the channel SVD's nested factors are the Σ-weighted SVD's,
    so that its hard-masked network is ``compress(model, plan, stats)``.
    The data-free search takes :data:`DATA_FREE_STEPS` steps; with data, ``steps`` more on batches
    of ``batch_size``. ``lr``: Adam's step, in fractions of each layer's full rank (lowered to a
    tenth along the steps); ``tau``: the temperature of the masks in ranks, annealed
    geometrically from ``tau[0]`` to ``tau[1]``; ``straight_through``: the share of the steps
    after which the masks are hard forward; ``temperature``: the distillation's. ``seed`` seeds the
    shuffling and the augmentation (the caller's random state is left as it was): one seed, one
    result. ``cp_rank``: the rank of the one CP whose terms a CP search orders (see
    :class:`Nested`). ``progress``: a progress bar over the steps.

    Returns a :class:`Search`: the plan, its ranks, the :class:`Trajectory` (continuous ranks and
    loss per step) for plotting, the cost and the time. The model is never modified. Raises
    ``ValueError`` for a budget outside (0, 1], a budget below rank 1 everywhere (the message of
    :class:`lowrank.ranks.budget`), empty data, a method the search does not support, or
    ``norm="data"`` without ``stats``.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if by not in ("params", "macs"):
        raise ValueError(f"by must be 'params' or 'macs', got {by!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if norm == "data" and stats is None:
        raise ValueError("a data-informed search (norm='data') needs stats=lowrank.calibrate(model, data)")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if data is not None and len(data) == 0:
        raise ValueError("the data are empty")
    found = {}

    class Rule:
        def allocate(self, layers):
            found.update(_run(model, layers, budget, data, by, norm, stats, int(steps), batch_size, lr,
                              tau, temperature, straight_through, seed, cp_rank, progress))
            return found["ranks"]

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):   # seeds random augmentation without touching the caller's generator
        torch.manual_seed(seed)
        plan = make_plan(model, method, Rule(), include=include, exclude=exclude, input_size=input_size, norm=norm)
    return Search(plan, found["ranks"], found["trajectory"], found["cost"], found["target"], by,
                  time.perf_counter() - start, {n.name: n for n in found["nested"]}, model)


def _run(model, layers, budget, data, by, norm, stats, steps, batch_size, lr, tau, temperature,
         straight_through, seed, cp_rank, progress):
    costs = [rules._Costs(layer, by) for layer in layers]
    target = budget * sum(c.dense for c in costs)
    rules.check_budget(costs, budget, by, target)
    if norm == "data":
        missing = [layer.name for layer in layers if layer.name not in stats]
        if missing:
            raise ValueError(f"stats lack the layers {missing[:3]}: calibrate with "
                             f"lowrank.calibrate(model, data, plan)")
    nested = [Nested(layer, None if norm != "data" else ridged(stats[layer.name].sigma), cp_rank)
              for layer in layers]
    full, layers_of = [], []
    for n in nested:
        layers_of.append(list(range(len(full), len(full) + len(n.full))))
        full.extend(n.full)
    cost = _Budget(costs, layers_of, full)
    trajectory = Trajectory(ranks={n.name: [] for n in nested})
    per_layer = lambda masks: [[masks[v] for v in vs] for vs in layers_of]

    def reconstruction(masks):
        return sum(n.error(m) for n, m in zip(nested, per_layer(masks)))

    descend = lambda u, loss, n: _descend(u, loss, n, cost, target, lr, tau, straight_through, trajectory,
                                          nested, layers_of, progress)
    # start: every rank lowered from full by ν ∂C/∂u onto the budget, then the data-free optimum
    u = descend(cost.project(torch.ones_like(cost.R), target), reconstruction, DATA_FREE_STEPS)
    if data is None:
        error = lambda i, rank: float(nested[i].error(nested[i].hard(rank)))
        gain = lambda i, old, new, r: error(i, old) - error(i, new)
    else:
        batches = _cycle(_loader(data, batch_size, torch.Generator().manual_seed(seed)))
        student = copy.deepcopy(model).train()   # BatchNorm on the statistics of each batch
        for p in student.parameters():
            p.requires_grad_(False)
        dtype = next(model.parameters()).dtype

        def distillation(masks):
            weights = {f"{n.name}.weight": n.weight(m).to(dtype) for n, m in zip(nested, per_layer(masks))}
            images = _as_input(next(batches), model)
            with torch.no_grad(), _eval(model):
                teacher = model(images)
            return _distillation(functional_call(student, weights, (images,)), teacher, temperature)

        trajectory.data_from = len(trajectory.loss)
        u = descend(u, distillation, steps)
        evaluate = _evaluator(model, student, nested, layers_of, data, temperature, batch_size)
        gain = lambda i, old, new, r: evaluate(r, i, old) - evaluate(r, i, new)
    r, total = _discretise((u * cost.R).tolist(), full, layers_of, costs, target, gain)
    ranks = {}
    for layer, c, vs in zip(layers, costs, layers_of):   # a layer that saves nothing is dense: full rank
        ranks[layer.name] = _layer_rank(c, [r[v] if c.saves(_layer_rank(c, [r[w] for w in vs])) else full[v]
                                            for v in vs])
    return dict(ranks=ranks, trajectory=trajectory, cost=total, target=target, nested=nested)


#: steps of the data-free search (which also starts the search with data)
DATA_FREE_STEPS = 200


def _descend(u, loss_of, steps, cost, target, lr, tau, straight_through, trajectory, nested, layers_of,
             progress):
    """``steps`` projected Adam steps on ``loss_of(masks)`` from the rank fractions ``u``; the
    projection onto the budget uses Adam's metric, so that a fixed point is a KKT point. Appends
    to ``trajectory``; returns the new ``u``."""
    R, full = cost.R, [int(x) for x in cost.R]
    tau0, tau1 = tau
    first, second = torch.zeros_like(u), torch.zeros_like(u)
    for step in trange(steps, desc="search", disable=not progress, leave=False):
        t = tau0 * (tau1 / tau0) ** (step / max(steps - 1, 1))
        eta = lr * (1 - 0.9 * step / max(steps - 1, 1))
        x = u.clone().requires_grad_(True)
        masks = soft_masks(x * R, full, t)
        if step >= straight_through * steps:   # hard masks forward, soft gradients backward
            masks = [m + (h - m).detach() for m, h in zip(masks, soft_masks((x * R).detach(), full, 0))]
        loss = loss_of(masks)
        (grad,) = torch.autograd.grad(loss, x)
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad.square()
        metric = 1 / ((second / (1 - 0.999 ** (step + 1))).sqrt() + 1e-12)
        u = cost.project(u - eta * metric * first / (1 - 0.9 ** (step + 1)), target, metric)
        trajectory.loss.append(float(loss.detach()))
        trajectory.tau.append(t)
        for n, vs in zip(nested, layers_of):
            value = [float(u[v] * R[v]) for v in vs]
            trajectory.ranks[n.name].append(tuple(value) if len(vs) > 1 else value[0])
    return u
