"""Model surgery: compress, structure, save and load; options, statistics and the checks before
any work. Random weights and inputs (labelled so) wherever only exactness or an error is tested."""
import pytest
import torch
import torch.nn as nn

import lowrank as lr
from lowrank.layers import ChannelSVDConv2d, LowRankLinear, Tucker2Conv2d


def small_net(seed=0):
    """Two convs and a linear head, random weights (float64)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).double()


def random_images(n=16, seed=1):
    return torch.randn(n, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


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


def spy(monkeypatch, cls):
    """Count the calls of ``cls.from_dense``."""
    calls, original = [], cls.from_dense.__func__

    def counted(klass, *args, **kwargs):
        calls.append(args[1])
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_dense", classmethod(counted))
    return calls


def test_options_go_only_to_the_layers_that_take_them(monkeypatch):
    model = small_net()
    plan = lr.plan(model, "cp", 4, input_size=(3, 8, 8))
    assert plan["4"]["type"] == "Linear" and len(plan.compressed()) == 3
    one = lr.compress(model, plan, progress=False, n_iter_max=1, line_search=False)
    many = lr.compress(model, plan, progress=False, n_iter_max=50)
    assert isinstance(one[4], LowRankLinear) and torch.equal(one[4].weight, many[4].weight)
    error = lambda small: float((small[2].weight - model[2].weight).detach().norm())
    assert error(many) < error(one)                  # n_iter_max reached CP-ALS
    ridged = lr.compress(model, plan, progress=False, ridge=0.5)    # frobenius plan: CP-ALS's ridge
    assert not torch.equal(ridged[2].weight, many[2].weight)


def test_unknown_options_are_refused_before_any_work(monkeypatch):
    """An option no method of the plan's norm takes is refused before the first layer; one that
    only other methods of the same norm take is ignored (one set of options for a sweep)."""
    model = small_net()
    calls = spy(monkeypatch, ChannelSVDConv2d)
    plan = lr.plan(model, "svd", 2, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"no layer of this plan \(Linear, svd; frobenius norm\) takes the option "
                                         r"'rel_floor'; it is an option of tucker2 \(data\), cp \(data\)"):
        lr.compress(model, plan, progress=False, rel_floor=1e-8)
    with pytest.raises(ValueError, match="'ridge'; it is an option of cp .frobenius., cp3 .frobenius., compress "
                                         "itself with norm='data'"):
        lr.compress(model, plan, progress=False, ridge=0.1)
    with pytest.raises(ValueError, match="option 'bogus'; no method takes it"):
        lr.compress(model, plan, progress=False, bogus=1)
    assert calls == []
    assert isinstance(lr.compress(model, plan, progress=False, n_iter_max=5)[0], ChannelSVDConv2d)
    data = lr.plan(model, "tucker2", 2, input_size=(3, 8, 8), norm="data")
    with pytest.raises(ValueError, match=r"'n_iter_max'; it is an option of cp \(frobenius\), cp3 \(frobenius\); "
                                         r"tucker2 takes \[.*'n_iter'.*\]"):
        lr.compress_sequential(model, data, random_images(), progress=False, n_iter_max=5)


def test_statistics_must_come_from_this_model_and_a_data_informed_plan():
    model, x = small_net(), random_images(64)
    data_plan = lr.plan(model, "svd", 2, input_size=(3, 8, 8), norm="data")
    with pytest.warns(UserWarning, match="4 needs 512"):     # the linear head: 1 vector per image
        stats = lr.calibrate(model, x, data_plan, progress=False)
    assert lr.measure.params(lr.compress(model, data_plan, stats, progress=False)) == data_plan.params
    with pytest.raises(ValueError, match="stats are used by data-informed plans only"):
        lr.compress(model, lr.plan(model, "svd", 2, input_size=(3, 8, 8)), stats=stats, progress=False)
    other = small_net(seed=1)         # same layers, other (random) weights
    with pytest.raises(ValueError, match="^0: the statistics were calibrated on other weights.*calibrate this"):
        lr.compress(other, data_plan, stats, progress=False)
    with pytest.raises(ValueError, match="needs statistics for \\['4'\\]"):
        lr.compress(model, data_plan, {n: s for n, s in stats.items() if n != "4"}, progress=False)
    swapped = {**stats, "2": stats["0"]}
    with pytest.raises(ValueError, match="^2: the statistics are of vectors of length 27, the layer takes 72"):
        lr.compress(model, data_plan, swapped, progress=False)


def test_a_module_under_two_names_is_replaced_under_both():
    """One conv registered twice (and so called twice by the Sequential): both names get the same
    new layer; its parameters count once, its MACs twice."""
    torch.manual_seed(0)
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared).double()
    plan = lr.plan(model, "svd", 2, input_size=(3, 8, 8))
    assert list(plan) == ["0", "1"] and plan["1"]["calls"] == 2
    small = lr.compress(model, plan, progress=False)
    assert small[1] is small[3] and isinstance(small[1], ChannelSVDConv2d)
    assert plan.params == lr.measure.params(small) and plan.macs == lr.measure.macs(small, (3, 8, 8))
    rebuilt = lr.structure(model, plan)
    assert rebuilt[1] is rebuilt[3]
    edited = plan.edit("1", rank=3)
    assert edited["1"]["calls"] == 2 and edited.macs == lr.measure.macs(lr.structure(model, edited), (3, 8, 8))


def test_compressing_a_compressed_model_is_refused(resnet20):
    plan = lr.plan(resnet20, "tucker2", 0.5, include=["layer1.*"])
    small = lr.compress(resnet20, plan, progress=False)
    with pytest.raises(ValueError, match="layer1.0.conv1 is already factorized \\(Tucker2Conv2d\\)"):
        lr.compress(small, plan, progress=False)
    again = lr.plan(small, "svd", 0.5, include=["layer2.*"])     # a plan of the compressed model itself
    assert lr.measure.params(lr.compress(small, again, progress=False)) == again.params


def test_save_refuses_a_model_that_is_not_the_plans_and_load_a_file_save_did_not_write(resnet20, tmp_path):
    plan = lr.plan(resnet20, "svd", 0.5, include=["layer3.*"])
    with pytest.raises(ValueError, match="layer3.0.conv1: the model's Conv2d is not the plan's ChannelSVDConv2d"):
        lr.save(tmp_path / "dense.pt", resnet20, plan)
    other = lr.compress(resnet20, lr.plan(resnet20, "svd", 0.3, include=["layer3.*"]), progress=False)
    with pytest.raises(ValueError, match="not the plan's ChannelSVDConv2d at rank"):
        lr.save(tmp_path / "other.pt", other, plan)
    torch.save(resnet20.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="raw.pt was not written by lowrank.save.*model.load_state_dict"):
        lr.load(tmp_path / "raw.pt", resnet20)


def test_errors_in_a_layer_name_it_and_say_what_to_do():
    """A zero layer has no CP (nor a data-informed Tucker-2); a plan made by hand skips lr.plan's
    checks of the weights."""
    model = small_net()
    with torch.no_grad():
        model[2].weight.zero_()
    with pytest.raises(ValueError, match=r"^2 \(cp, rank 4\): .*all-zero.*keep the layer dense "
                                         r"\(plan.edit\('2', method='dense'\)\)"):
        lr.compress(model, lr.plan(model, "cp", 4, input_size=(3, 8, 8)), progress=False)
    plan = lr.plan(model, "tucker2", 2, input_size=(3, 8, 8), norm="data", include=["2"])
    stats = lr.calibrate(model, random_images(), plan, progress=False)
    with pytest.raises(ValueError, match=r"^2 \(tucker2, rank \[2, 2\]\): .*zero.*keep the layer dense"):
        lr.compress(model, plan, stats, progress=False)
    model = small_net()
    plan = lr.plan(model, "svd", 2, input_size=(3, 8, 8))
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    with pytest.raises(ValueError, match="^0: the weight or bias holds NaN or infinite values"):
        lr.compress(model, plan, progress=False)
