import pytest
import torch

import lowrank as lr
from lowrank.plans import Layer, input_sizes
from lowrank.ranks import _Costs


@pytest.fixture(scope="module")
def resnet56():
    return lr.models.resnet56()


def block_layers(model, method):
    sizes, modules = input_sizes(model, (3, 32, 32)), dict(model.named_modules())
    return [Layer(n, modules[n], method, sizes[n]) for n in sizes if n.startswith("layer")]


def selected(plan, key="params"):
    """(dense, compressed) cost of the plan's layers."""
    return sum(e[key][0] for e in plan.layers.values()), sum(e[key][1] for e in plan.layers.values())


def energy_kept(layers, ranks):
    """Mean over layers of the share of squared singular values kept (for Tucker-2 the bound
    e_T + e_S − 1); pass a layer's full rank for a layer left dense."""
    shares = []
    for layer in layers:
        r = ranks[layer.name]
        rs = r if isinstance(r, tuple) else (r,)
        parts = [float(s2[:k].sum() / s2.sum()) for s2, k in zip(spectra(layer), rs)]
        shares.append(sum(parts) - (len(parts) - 1))
    return sum(shares) / len(shares)


_spectra = {}


def spectra(layer):
    """Squared singular values of the layer's matrices (computed once per layer and method)."""
    key = (layer.name, layer.method, id(layer.module))
    if key not in _spectra:
        _spectra[key] = [torch.linalg.svdvals(M.double()).square() for M in layer.matrices()]
    return _spectra[key]


def test_tau_one_keeps_full_rank_and_ranks_are_monotone_in_tau(resnet56):
    layer = block_layers(resnet56, "svd")[-1]
    assert lr.ranks.energy(1.0)(layer) == min(layer.module.weight.shape[0], layer.module.weight[0].numel())
    taus = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0]
    for method in ("svd", "tucker2"):
        for layer in block_layers(resnet56, method)[::9]:
            ranks = [lr.ranks.energy(t)(layer) for t in taus]
            flat = [r if isinstance(r, tuple) else (r,) for r in ranks]
            assert all(all(a <= b for a, b in zip(x, y)) for x, y in zip(flat, flat[1:]))
            assert flat[0] != flat[-1]


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial", "cp", "cp3"])
def test_closed_form_costs_match_the_built_layers(resnet56, method):
    linear = Layer("linear", resnet56.linear, "svd", (64,))
    for layer in block_layers(resnet56, method)[::13] + [linear]:
        costs = _Costs(layer, "macs")
        full = layer.full_rank() or 300           # CP: no full rank; 300 saves nothing on these layers
        ranks = [(1, 1), (3, 5), (full[0], 2), full] if isinstance(full, tuple) else [1, 3, full // 2, full]
        for r in ranks:
            params, macs = layer.cost(r)
            assert costs.params(r) == params
            assert costs(r) == (macs if params < layer.dense_cost()[0] else layer.dense_cost()[1])


@pytest.mark.parametrize("method,by", [("svd", "params"), ("tucker2", "params"), ("svd", "macs")])
def test_greedy_meets_the_budget_within_one_rank_step(resnet56, method, by):
    layers = block_layers(resnet56, method)
    for fraction in (0.15, 0.4):
        plan = lr.plan(resnet56, method, lr.ranks.budget(fraction, by=by), include=["layer*"])
        dense, small = selected(plan, by)
        costs = {layer.name: _Costs(layer, by) for layer in layers}
        steps = []  # the cost of one more rank step of each compressed layer
        for name in plan.compressed():
            r, c = plan[name]["rank"], costs[name]
            nxt = [(r[0] + 1, r[1]), (r[0], r[1] + 1)] if isinstance(r, list) else [r + 1]
            steps += [c(n) - c(tuple(r) if isinstance(r, list) else r) for n in nxt]
        assert small <= fraction * dense
        assert small >= fraction * dense - max(steps)


def test_bisect_is_one_energy_threshold_within_the_budget(resnet56):
    layers = block_layers(resnet56, "svd")
    ranks = lr.ranks.budget(0.3, method="bisect").allocate(layers)
    plan = lr.plan(resnet56, "svd", ranks, include=["layer*"])
    dense, small = selected(plan)
    assert 0.28 * dense <= small <= 0.3 * dense
    # the ranks are those of energy(τ) for one τ: layer l's rank r_l holds for τ in (e_l(r_l − 1), e_l(r_l)]
    lows, highs = [], []
    for layer in layers:
        s2 = torch.linalg.svdvals(layer.matrices()[0].double()).square()
        share = torch.cat([torch.zeros(1, dtype=s2.dtype), s2.cumsum(0) / s2.sum()])
        lows.append(float(share[ranks[layer.name] - 1]))
        highs.append(float(share[ranks[layer.name]]))
    tau = (max(lows) + min(highs)) / 2
    assert max(lows) < min(highs)
    assert all(lr.ranks.energy(tau)(layer) == ranks[layer.name] for layer in layers[::5])


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_greedy_keeps_more_energy_than_uniform_at_the_same_budget(resnet56, method):
    layers = block_layers(resnet56, method)
    for fraction in (0.2, 0.5):
        uniform = lr.plan(resnet56, method, lr.ranks.keep(fraction), include=["layer*"])
        dense, small = selected(uniform)
        plan = lr.plan(resnet56, method, lr.ranks.budget(small / dense), include=["layer*"])
        assert selected(plan)[1] <= small
        assert energy_kept(layers, plan_ranks(plan, layers)) >= energy_kept(layers, plan_ranks(uniform, layers))


def plan_ranks(plan, layers):
    """Rank of every layer in ``plan``, full rank for a layer it keeps dense."""
    ranks = {}
    for layer in layers:
        e = plan[layer.name]
        r = tuple(e["rank"]) if isinstance(e["rank"], list) else e["rank"]
        ranks[layer.name] = layer.full_rank() if e["method"] == "dense" else r
    return ranks


def test_impossible_budgets_and_bad_arguments_raise(resnet56):
    layers = block_layers(resnet56, "svd")
    with pytest.raises(ValueError, match="minimum"):
        lr.ranks.budget(0.01).allocate(layers)
    with pytest.raises(ValueError, match="minimum"):
        lr.ranks.budget(0.01, method="bisect").allocate(layers)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            lr.ranks.budget(bad)
        with pytest.raises(ValueError, match="tau"):
            lr.ranks.energy(bad)
    with pytest.raises(ValueError, match="by"):
        lr.ranks.budget(0.5, by="flops")
    with pytest.raises(ValueError, match="method"):
        lr.ranks.budget(0.5, method="anneal")
    cp = [Layer(layers[0].name, layers[0].module, "cp", layers[0].input_size)]
    with pytest.raises(ValueError, match="spectrum"):
        lr.ranks.budget(0.5).allocate(cp)


def test_full_budget_keeps_every_layer_dense(resnet56):
    plan = lr.plan(resnet56, "svd", lr.ranks.budget(1.0), include=["layer3*"])
    assert plan.compressed() == []


def test_the_data_informed_budget_takes_channel_svd_stats_only(resnet56):
    images = torch.stack([lr.data.cifar10("test", limit=8)[i][0] for i in range(8)])
    two = ["layer1.0.conv1", "layer3.0.conv1"]
    stats = lr.calibrate(resnet56, images, layers=two, progress=False)
    informed = lr.plan(resnet56, "svd", lr.ranks.budget(0.3, stats=stats), include=two, norm="data")
    plain = lr.plan(resnet56, "svd", lr.ranks.budget(0.3), include=two)
    assert [informed[n]["rank"] for n in two] != [plain[n]["rank"] for n in two]
    with pytest.raises(ValueError, match="layer1.0.conv2: the stats have no entry"):
        lr.plan(resnet56, "svd", lr.ranks.budget(0.3, stats=stats), include=["layer1.0.conv*"])
    with pytest.raises(ValueError, match="layer1.0.conv1: a data-informed budget .* 'tucker2'"):
        lr.plan(resnet56, "tucker2", lr.ranks.budget(0.3, stats=stats), include=["layer1.0.conv1"])
