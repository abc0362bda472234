import pytest
import torch
import torch.nn as nn

import lowrank as lr
from lowrank.ranks import energy_rank, entropy_rank


@pytest.fixture(scope="module")
def resnet20():
    return lr.models.resnet20()


def test_energy_rank_on_a_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, t) for t in (0.5, 9 / 14, 0.9, 13 / 14, 1.0)] == [1, 1, 2, 2, 3]
    flat = torch.ones(4)  # equal entropy terms: a share τ of the entropy needs ⌈4τ⌉ of them
    assert [entropy_rank(flat, t) for t in (0.2, 0.25, 0.5, 0.6, 1.0)] == [1, 1, 2, 3, 4]


def test_tau_one_keeps_full_rank_and_ranks_grow_with_tau(resnet20):
    layer = lr.plans.Layer("layer3.0.conv2", resnet20.layer3[0].conv2, "svd", (64, 8, 8))
    assert lr.ranks.energy(1.0)(layer) == 64
    tucker = lr.plans.Layer("layer3.0.conv2", resnet20.layer3[0].conv2, "tucker2", (64, 8, 8))
    assert lr.ranks.energy(1.0)(tucker) == (64, 64)
    for rule in (lr.ranks.energy, lr.ranks.entropy):
        ranks = [rule(t)(layer) for t in (0.3, 0.5, 0.7, 0.9, 0.99)]
        assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_rules_in_a_plan(resnet20):
    plan = lr.plan(resnet20, "tucker2", lr.ranks.vbmf(), exclude=["conv1", "linear"])
    ranks = [tuple(e["rank"]) for e in plan.layers.values()]
    assert all(1 <= r <= 64 for pair in ranks for r in pair)
    assert len(set(ranks)) > 1  # adaptive: not the same everywhere


@pytest.mark.parametrize("tau", [0, -0.1, 1.5])
def test_tau_outside_unit_interval_raises(tau):
    for rule in (lr.ranks.energy, lr.ranks.entropy):
        with pytest.raises(ValueError, match="tau"):
            rule(tau)


@pytest.mark.parametrize("rule", [lr.ranks.energy(0.9), lr.ranks.entropy(0.9), lr.ranks.vbmf(), lr.ranks.budget(0.5),
                                  lr.ranks.budget(0.5, method="bisect"), lr.ranks.budget(0.5, score="entropy")])
def test_an_all_zero_layer_gets_rank_one_which_is_exact(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3))
    with torch.no_grad():
        model[1].weight.zero_()
    plan = lr.plan(model, "svd", rule)
    assert plan["1"]["rank"] == 1 and plan["1"]["method"] == "svd"
    small = lr.compress(model, plan, progress=False)
    assert not small[1].weight.detach().any()
    assert energy_rank(torch.zeros(5), 0.9) == entropy_rank(torch.zeros(5), 0.9) == 1
    assert entropy_rank(torch.tensor([3.0, 0.0, 0.0]), 0.9) == 1
