import json

import pytest
import torch
import torch.nn as nn

import lowrank as lr
from lowrank.layers import LowRankLinear, Tucker2Conv2d


@pytest.fixture(scope="module")
def resnet20():
    return lr.models.resnet20()


@pytest.fixture(scope="module")
def images():
    return torch.stack([lr.data.cifar10("test", limit=16)[i][0] for i in range(16)])


def test_plan_keeps_the_requested_share_of_parameters(resnet20):
    plan = lr.plan(resnet20, "svd", 0.5, exclude=["conv1", "linear"])
    assert plan.compressed() == [n for n in plan if n.startswith("layer")]
    for name, e in plan.items():
        assert e["params"][1] <= 0.5 * e["params"][0]
        # one rank more would exceed the share
        bigger = lr.plan(resnet20, "svd", {name: e["rank"] + 1}, include=[name])[name]
        assert bigger["params"][1] > 0.5 * e["params"][0]
    assert plan.params == lr.measure.params(lr.compress(resnet20, plan, progress=False))


def test_plan_costs_match_the_compressed_model(resnet20):
    for method in ["svd", "spatial", "tucker2", "cp"]:
        plan = lr.plan(resnet20, method, 0.3, include=["layer2.*", "linear"])
        small = lr.structure(resnet20, plan)
        assert plan.params == lr.measure.params(small)
        assert plan.macs == lr.measure.macs(small)


def test_rank_above_break_even_stays_dense_and_says_so(resnet20):
    plan = lr.plan(resnet20, "svd", 16, include=["layer1.0.conv1"])  # 16·(16·9 + 16) > 16·16·9
    e = plan["layer1.0.conv1"]
    assert e["method"] == "dense" and "parameters" in e["note"] and e["params"][0] == e["params"][1]
    assert plan.compressed() == []


def test_ranks_as_int_dict_and_rule(resnet20):
    assert lr.plan(resnet20, "tucker2", 8, include=["layer3.0.conv1"])["layer3.0.conv1"]["rank"] == [8, 8]
    assert lr.plan(resnet20, "tucker2", 20, include=["layer1.0.conv1"])["layer1.0.conv1"]["method"] == "dense"
    plan = lr.plan(resnet20, "svd", {"layer1.0.conv1": 3}, include=["layer1.0.*"])
    assert plan["layer1.0.conv1"]["rank"] == 3 and plan["layer1.0.conv2"]["method"] == "dense"
    rule = lambda layer: 2
    assert lr.plan(resnet20, "svd", rule, include=["linear"])["linear"]["rank"] == 2


def test_plan_json_round_trip_and_edit(resnet20):
    plan = lr.plan(resnet20, "tucker2", 0.4, exclude=["conv1"])
    again = lr.Plan.from_json(plan.to_json())
    assert again == plan and str(again) == str(plan)
    json.loads(plan.to_json())  # plain data
    again.edit("layer1.0.conv1", rank=[4, 4])
    assert again["layer1.0.conv1"]["rank"] == [4, 4] and again != plan
    assert again["layer1.0.conv1"]["params"][1] == 16 * 4 + 4 * 4 * 9 + 4 * 16
    again.edit("layer1.0.conv2", method="dense")
    assert "layer1.0.conv2" not in again.compressed()
    assert "layer1.0.conv1" in str(again) and "<table>" in again._repr_html_()


def test_compress_returns_a_new_model_and_leaves_the_input_untouched(resnet20, images):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    modules = dict(resnet20.named_modules())
    plan = lr.plan(resnet20, "tucker2", 0.5)
    small = lr.compress(resnet20, plan, progress=False)
    assert small is not resnet20
    assert all(torch.equal(before[k], v) for k, v in resnet20.state_dict().items())
    assert dict(resnet20.named_modules()).keys() == modules.keys()
    assert isinstance(small.layer1[0].conv1, Tucker2Conv2d) and isinstance(small.linear, LowRankLinear)


def test_full_rank_compression_reproduces_the_model(resnet20, images):
    plan = lr.plan(resnet20, "svd", 10**6)  # every layer at full rank: above break-even, kept dense
    assert plan.compressed() == []
    for name in plan:  # so force the factorization by hand
        e = plan[name]
        T = e["config"].get("out_channels", e["config"].get("out_features"))
        plan.layers[name] = {**e, "method": "svd", "rank": T}
    small = lr.compress(resnet20, plan, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(small(images), resnet20(images), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_gives_identical_outputs(resnet20, images, tmp_path):
    plan = lr.plan(resnet20, "spatial", 0.5, exclude=["linear"])
    small = lr.compress(resnet20, plan, progress=False)
    lr.save(tmp_path / "small.pt", small, plan)
    again, plan_again = lr.load(tmp_path / "small.pt", lr.models.resnet20(pretrained=False))
    assert plan_again == plan
    with torch.no_grad():
        assert torch.equal(again(images), small(images))


def test_bad_plans_raise(resnet20):
    with pytest.raises(ValueError, match="method"):
        lr.plan(resnet20, "qr", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        lr.plan(resnet20, "svd", 1.5)
    with pytest.raises(ValueError, match="positive integer"):
        lr.plan(resnet20, "svd", 0)
    with pytest.raises(ValueError, match="not in the plan"):
        lr.plan(resnet20, "svd", {"layer9.conv": 3})
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        lr.plan(resnet20, "svd", 0.5, include=["nothing*"])
    grouped = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="1: grouped"):
        lr.plan(grouped, "svd", 0.5, include=["1"])
    plan = lr.plan(grouped, "svd", 0.5)
    assert list(plan) == ["0"] and "groups" in plan.skipped["1"]
    other = lr.plan(lr.models.resnet56(pretrained=False), "svd", 0.5)
    with pytest.raises(ValueError, match="does not have"):
        lr.compress(resnet20, other, progress=False)
    wide = lr.plan(lr.models.resnet20(pretrained=False), "svd", 0.5)
    wide.layers["layer1.0.conv1"]["config"]["in_channels"] = 17
    with pytest.raises(ValueError, match="does not match"):
        lr.compress(resnet20, wide, progress=False)
