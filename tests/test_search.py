"""The continuous rank search: exact budgets, the masked network is the compressed one, the
data-free search is the greedy allocation, determinism, and the errors it raises."""
import copy

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.ranks import _Costs

BLOCKS = ["layer2.*"]          # six real convs of ResNet-20: quick, and of two shapes


def small_cnn(seed=0):
    """A random CNN with convs of several settings (random weights: for budgets and exactness only)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, (3, 1), padding=(2, 0), dilation=(2, 1)), nn.ReLU(),
                         nn.Conv2d(16, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 10)).eval()


def planned_cost(plan, by):
    key = "params" if by == "params" else "macs"
    return sum(e[key][1] for e in plan.layers.values()), sum(e[key][0] for e in plan.layers.values())


def smallest_step(found, by):
    """The cheapest single rank step of any searched layer that is not at its full rank."""
    steps = []
    for name, n in found.nested.items():
        from lowrank.plans import Layer

        layer = Layer(name, found.model.get_submodule(name), n.method, tuple(found.plan[name]["input"]))
        c, r = _Costs(layer, by), found.ranks[name]
        rs = list(r) if isinstance(r, tuple) else [r]
        for v in range(len(rs)):
            if rs[v] < n.full[v] and c.saves(r):
                up = list(rs)
                up[v] += 1
                steps.append(c(tuple(up) if isinstance(r, tuple) else up[0]) - c(r))
    return min(steps) if steps else float("inf")


@pytest.mark.parametrize("method", ["svd", "spatial", "tucker2", "cp"])
@pytest.mark.parametrize("by", ["params", "macs"])
def test_the_budget_is_met_exactly_on_a_random_cnn(method, by):
    model = small_cnn()
    for budget in (0.25, 0.6, 1.0):
        found = lr.search(model, method, budget, by=by, progress=False, input_size=(3, 16, 16))
        spent, dense = planned_cost(found.plan, by)
        assert spent == found.cost <= budget * dense            # never above the budget
        assert budget * dense - spent < smallest_step(found, by)  # less than one rank step below
        for name, n in found.nested.items():                   # never above full rank
            r = found.ranks[name]
            assert all(1 <= k <= R for k, R in zip(r if isinstance(r, tuple) else (r,), n.full))


def test_the_budget_is_met_exactly_on_resnet20(resnet20):
    for method, budget, by in [("svd", 0.2, "params"), ("tucker2", 0.35, "macs")]:
        found = lr.search(resnet20, method, budget, by=by, include=BLOCKS, progress=False)
        spent, dense = planned_cost(found.plan, by)
        assert spent <= budget * dense and budget * dense - spent < smallest_step(found, by)


def test_the_smallest_feasible_budget_and_an_impossible_one_raise_like_ranks_budget():
    model = small_cnn()
    least, dense = planned_cost(lr.plan(model, "svd", 1, input_size=(3, 16, 16)), "params")
    fraction = least / dense
    found = lr.search(model, "svd", fraction + 1e-9, progress=False, input_size=(3, 16, 16))
    assert all(r == 1 for r in found.ranks.values())
    with pytest.raises(ValueError) as expected:
        lr.plan(model, "svd", lr.ranks.budget(fraction * 0.9), input_size=(3, 16, 16))
    with pytest.raises(ValueError) as raised:
        lr.search(model, "svd", fraction * 0.9, progress=False, input_size=(3, 16, 16))
    assert str(raised.value) == str(expected.value) and "below the minimum" in str(raised.value)


@pytest.mark.parametrize("method", ["svd", "spatial", "tucker2"])
def test_the_hard_masked_network_is_the_compressed_network(method, images):
    """Searched and masked in float64: the masked weights are exactly the truncated factorizations
    compress builds at the ranks found (Tucker-2: the HOSVD, n_iter=0)."""
    model = lr.models.resnet20().double()
    found = lr.search(model, method, 0.4, include=BLOCKS, progress=False)
    options = {"n_iter": 0} if method == "tucker2" else {}
    small = lr.compress(model, found.plan, progress=False, **options)
    x = images.double()
    with torch.no_grad():
        assert torch.allclose(found.masked().eval()(x), small.eval()(x), rtol=1e-9, atol=1e-9)
    ranks = {n: (2, 3) if method == "tucker2" else 2 for n in found.ranks}     # any ranks, not only those found
    other = lr.compress(model, lr.plan(model, method, ranks, include=BLOCKS), progress=False, **options)
    with torch.no_grad():
        assert torch.allclose(found.masked(ranks).eval()(x), other.eval()(x), rtol=1e-9, atol=1e-9)


def test_the_sigma_masked_network_is_the_data_informed_compressed_network(images):
    model = lr.models.resnet20().double()
    stats = lr.calibrate(model, images, progress=False)
    found = lr.search(model, "svd", 0.4, include=BLOCKS, norm="data", stats=stats, progress=False)
    small = lr.compress(model, found.plan, stats, progress=False)
    with torch.no_grad():
        assert torch.allclose(found.masked().eval()(images.double()), small.eval()(images.double()),
                              rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method, budget", [("svd", 0.2), ("svd", 0.5), ("spatial", 0.3)])
def test_the_data_free_search_is_the_greedy_allocation(resnet20, method, budget):
    found = lr.search(resnet20, method, budget, exclude=["conv1", "linear"], progress=False)
    greedy = lr.plan(resnet20, method, lr.ranks.budget(budget), exclude=["conv1", "linear"])
    assert found.plan == greedy


def test_the_data_free_search_in_the_sigma_norm_is_the_data_informed_greedy_allocation(resnet20, images):
    stats = lr.calibrate(resnet20, images, progress=False)
    found = lr.search(resnet20, "svd", 0.3, include=BLOCKS, norm="data", stats=stats, progress=False)
    greedy = lr.plan(resnet20, "svd", lr.ranks.budget(0.3, stats=stats), include=BLOCKS, norm="data")
    assert found.plan == greedy
    plain = lr.plan(resnet20, "svd", lr.ranks.budget(0.3), include=BLOCKS, norm="data")
    assert found.plan != plain          # the Σ-whitened spectra give other ranks than the plain ones


def test_a_search_with_data_is_deterministic_and_leaves_the_model_untouched(images):
    model = lr.models.resnet20()
    before = copy.deepcopy(model.state_dict())
    data = torch.cat([images] * 4)
    runs = [lr.search(model, "svd", 0.4, data=data, include=BLOCKS, steps=6, batch_size=16, seed=s,
                      progress=False) for s in (1, 1, 2)]
    assert runs[0].ranks == runs[1].ranks and runs[0].trajectory == runs[1].trajectory
    assert runs[0].trajectory.loss != runs[2].trajectory.loss        # the seed does something
    assert runs[0].trajectory.data_from is not None
    assert len(runs[0].trajectory.loss) == runs[0].trajectory.data_from + 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())        # still in eval mode


def test_a_search_with_data_meets_the_budget_even_when_every_step_measures_harmful(images, monkeypatch):
    """A loss measured on a few images is noisy: a rank step may seem to cost accuracy. The
    discretisation still fills the budget to within one rank step, the least harmful steps last."""
    import sys

    def harmful(*args, **kw):   # a loss that grows with every rank: each step "hurts"
        return lambda r, i, rank: sum(r) + sum(rank if isinstance(rank, tuple) else (rank,))

    monkeypatch.setattr(sys.modules["lowrank.search"], "_evaluator", harmful)
    model = lr.models.resnet20()
    found = lr.search(model, "svd", 0.4, data=images, include=BLOCKS, steps=2, batch_size=16,
                      progress=False)
    spent, dense = planned_cost(found.plan, "params")
    assert spent <= 0.4 * dense and 0.4 * dense - spent < smallest_step(found, "params")


def test_bad_arguments_raise():
    model = small_cnn()
    kw = dict(progress=False, input_size=(3, 16, 16))
    for budget in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="budget"):
            lr.search(model, "svd", budget, **kw)
    with pytest.raises(ValueError, match="data are empty"):
        lr.search(model, "svd", 0.5, data=torch.zeros(0, 3, 16, 16), **kw)
    with pytest.raises(ValueError, match="unknown method"):
        lr.search(model, "tt", 0.5, **kw)
    with pytest.raises(ValueError, match="needs stats"):
        lr.search(model, "svd", 0.5, norm="data", **kw)
    with pytest.raises(ValueError, match="by must be"):
        lr.search(model, "svd", 0.5, by="flops", **kw)
    with pytest.raises(ValueError, match="steps"):
        lr.search(model, "svd", 0.5, steps=0, **kw)
