import copy
import itertools
import json

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank import deploy
from lowrank.layers import ChannelSVDConv2d, CPConv2d, LowRankLinear, SpatialSVDConv2d, Tucker2Conv2d

HOLDOUT = dict(in_channels=6, out_channels=10, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))


def random_layer(cls, rank, seed=0, **extra):
    """A factorized layer at the holdout setting with random float64 factors and a bias."""
    torch.manual_seed(seed)
    return cls(**HOLDOUT, rank=rank, **extra).double()


@pytest.mark.parametrize("cls, rank, extra, count", [
    (Tucker2Conv2d, (4, 3), {}, 4), (ChannelSVDConv2d, 5, {}, 2), (SpatialSVDConv2d, 4, {}, 1),
    (CPConv2d, 7, {"form": "4way"}, 2), (CPConv2d, 7, {"form": "3way"}, 1)])
def test_every_form_of_a_factorized_layer_is_exact(cls, rank, extra, count):
    layer = random_layer(cls, rank, **extra).eval()
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    options = deploy.forms(layer)
    assert options[0] is layer and len(options) == count
    for form in options:
        torch.testing.assert_close(form(x), layer(x))
    if cls is Tucker2Conv2d:   # the last form is the dense conv itself
        assert isinstance(options[-1], nn.Conv2d) and options[-1].weight.shape == (10, 6, 3, 5)


def test_a_low_rank_linear_merges_into_its_dense_layer():
    torch.manual_seed(0)
    layer = LowRankLinear(7, 5, 3).double()
    merged = deploy.forms(layer)[-1]
    assert isinstance(merged, nn.Linear)
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(merged(x), layer(x))


def test_a_pointwise_conv_with_bias_never_merges_into_a_zero_padded_conv():
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 3, 1).double(), nn.Conv2d(3, 5, 3, padding=1).double()
    assert not deploy._mergeable(a, b)    # the padding would see zeros where a gives its bias
    b_valid = nn.Conv2d(3, 5, 3).double()
    assert deploy._mergeable(a, b_valid)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(deploy._merged(a, b_valid)(x), b_valid(a(x)))


def test_merge_by_macs_merges_only_where_it_saves():
    torch.manual_seed(0)
    keep = Tucker2Conv2d(16, 16, 3, rank=(4, 4), padding=1)          # small ranks: factors are cheaper
    full_in = Tucker2Conv2d(16, 16, 3, rank=(4, 16), padding=1)      # rS = S: the first 1×1 only adds MACs
    model = nn.Sequential(keep, nn.ReLU(), full_in).eval()
    merged = deploy.merge(model, input_size=(16, 8, 8))
    assert isinstance(merged[0], Tucker2Conv2d) and not isinstance(merged[2], Tucker2Conv2d)
    assert lr.measure.macs(merged, (16, 8, 8)) < lr.measure.macs(model, (16, 8, 8))
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-5)
    assert isinstance(model[2], Tucker2Conv2d)   # the model is untouched


@pytest.mark.parametrize("method", ["tucker2", "svd", "cp"])
def test_optimize_is_exact_on_a_compressed_resnet20(resnet20, images, method):
    plan = lr.plan(resnet20, method, 0.3, exclude=["conv1", "linear"])
    small = lr.compress(resnet20, plan, progress=False, **({"n_iter_max": 5} if method == "cp" else {}))
    before = copy.deepcopy(small.state_dict())
    fast = deploy.optimize(small)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert fast.layer1[0].conv1[-1].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), small.eval()(images), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())


def test_onnx_export_runs_exactly_in_onnx_runtime(tmp_path, images):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(Tucker2Conv2d(3, 8, 3, rank=(4, 2), padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), LowRankLinear(8, 10, 3)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.normal_()
    fast = deploy.optimize(model)
    path = deploy.export_onnx(fast, tmp_path / "model.onnx")
    onnx_model = deploy.OnnxModel(path, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(images), model(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(onnx_model(images[:1]), model(images[:1]), rtol=1e-4, atol=1e-5)  # any batch
    data = torch.utils.data.TensorDataset(images, torch.arange(16) % 10)
    assert lr.measure.accuracy(onnx_model, data) == lr.measure.accuracy(model, data)
    assert lr.measure.latency(onnx_model, 2, threads=1, min_run_time=0.01, clock="cpu").seconds > 0


def fake_table(layers, seconds, dense, network):
    """A LatencyTable written by hand: ``seconds(layer, rank)`` for each candidate rank."""
    rows = {}
    for layer in layers:
        T, S = layer.full_rank()
        ranks = {(max(1, T * k // 8), max(1, S * k // 8)): seconds(layer, k) for k in range(1, 7)}
        rows[layer.name] = {"method": "tucker2", "dense": dense(layer), "ranks": ranks}
    return deploy.LatencyTable(rows, network)


@pytest.fixture(scope="module")
def layers20(resnet20):
    plan = lr.plan(resnet20, "tucker2", 0.5, exclude=["conv1", "linear"])
    modules = dict(resnet20.named_modules())
    return [lr.plans.Layer(n, modules[n], "tucker2", tuple(e["input"])) for n, e in plan.items()]


def test_latency_budget_is_met_within_five_percent_and_keeps_slow_layers_dense(resnet20, layers20):
    slow = "layer3.1.conv1"   # its factorized forms are slower than dense at every rank
    seconds = lambda layer, k: (3.0 + k if layer.name == slow else 0.2 + 0.15 * k) * 1e-3
    table = fake_table(layers20, seconds, dense=lambda layer: 1e-3, network=30e-3)   # 18 ms of layers, 12 ms rest
    for fraction in (0.9, 0.8, 0.7):
        rule = lr.ranks.budget(fraction, by="latency", table=table)
        plan = lr.plan(resnet20, "tucker2", rule, exclude=["conv1", "linear"])
        predicted = table.predict(plan)
        assert predicted == pytest.approx(rule.predicted)
        assert 0.95 * fraction * table.network <= predicted <= fraction * table.network
        assert plan[slow]["method"] == "dense" and "slower factorized at every measured rank" in plan[slow]["note"]
        assert "by the rank rule" in plan.summary()


def test_latency_budget_scales_what_the_layers_save(resnet20, layers20):
    seconds = lambda layer, k: (0.2 + 0.1 * k) * 1e-3
    table = fake_table(layers20, seconds, dense=lambda layer: 1e-3, network=30e-3)
    table.scale = 0.5   # the network shows half of what the layers save alone
    rule = lr.ranks.budget(0.8, by="latency", table=table)
    plan = lr.plan(resnet20, "tucker2", rule, exclude=["conv1", "linear"])
    saved = sum(table.layers[n]["dense"] - table.seconds(n, plan[n]) for n in plan.compressed())
    assert table.predict(plan) == pytest.approx(table.network - 0.5 * saved)
    assert 0.95 * 0.8 * table.network <= table.predict(plan) <= 0.8 * table.network


def test_latency_greedy_is_within_one_step_of_the_best_allocation():
    """Three layers with a handful of options each: the greedy's score is at most one option's
    score below the best allocation found by trying them all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1))
    plan = lr.plan(model, "tucker2", 0.5, input_size=(8, 6, 6))
    modules = dict(model.named_modules())
    layers = [lr.plans.Layer(n, modules[n], "tucker2", (8, 6, 6)) for n in plan]
    g = torch.Generator().manual_seed(1)
    rows = {}
    for layer in layers:
        ranks = {(k, k): float(torch.rand(1, generator=g)) * 1e-3 + k * 1e-4 for k in range(1, 6)}
        rows[layer.name] = {"method": "tucker2", "dense": 1.2e-3, "ranks": ranks}
    table = deploy.LatencyTable(rows, network=4e-3)
    rule = lr.ranks.budget(0.6, by="latency", table=table)
    chosen = rule.allocate(layers)
    score = {}
    for layer in layers:
        gains = [lr.ranks._gains(lr.ranks._singular_values(M), "energy") for M in layer.matrices()]
        score[layer.name] = {r: sum(sum(gm[:k]) for gm, k in zip(gains, r)) - 1 for r in rows[layer.name]["ranks"]}
        score[layer.name][None] = 1.0
    seconds = lambda n, r: rows[n]["dense"] if r is None else rows[n]["ranks"][r]
    limit = 0.6 * table.network - (table.network - 3 * 1.2e-3)
    best = max(sum(score[n][r] for n, r in zip(rows, combo))
               for combo in itertools.product(*[list(score[n]) for n in rows])
               if sum(seconds(n, r) for n, r in zip(rows, combo)) <= limit + 1e-15)
    got = sum(score[n][chosen[n]] for n in rows)
    assert sum(seconds(n, chosen[n]) for n in rows) <= limit + 1e-15
    step = max(abs(a - b) for s in score.values() for a in s.values() for b in s.values())
    assert best - step <= got <= best + 1e-12


def test_latency_budget_errors(resnet20, layers20):
    with pytest.raises(ValueError, match="needs the layers' measured times"):
        lr.ranks.budget(0.5, by="latency")
    with pytest.raises(ValueError, match="only used with by='latency'"):
        lr.ranks.budget(0.5, table=deploy.LatencyTable({}, 1.0))
    table = fake_table(layers20[1:], lambda layer, k: 1e-4 * k, lambda layer: 1e-3, 30e-3)
    with pytest.raises(ValueError, match=f"{layers20[0].name}: not in the latency table"):
        lr.plan(resnet20, "tucker2", lr.ranks.budget(0.5, by="latency", table=table), exclude=["conv1", "linear"])
    table = fake_table(layers20, lambda layer, k: 5e-4 + 1e-4 * k, lambda layer: 1e-3, 30e-3)
    with pytest.raises(ValueError, match="below the minimum: .* 0.7600 of the dense time"):
        lr.plan(resnet20, "tucker2", lr.ranks.budget(0.5, by="latency", table=table), exclude=["conv1", "linear"])
    with pytest.raises(ValueError, match="timed tucker2 factors, the plan asks for svd"):
        lr.plan(resnet20, "svd", lr.ranks.budget(0.9, by="latency", table=table), exclude=["conv1", "linear"])


def test_layer_times_are_cached_per_machine_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    times = deploy.LayerTimes(batch_size=2, rounds=1, min_run_time=0.001)
    first = times.measure([conv, nn.Conv2d(4, 4, 3, padding=1)], (4, 6, 6))
    assert first[0] == first[1] > 0      # the same shape is timed once
    small, large = times.measure([conv, conv], [(4, 3, 3), (4, 12, 12)])   # one size per module
    assert small < large and times.measure([conv], [4, 6, 6]) == first[:1]
    assert times.path.parent == tmp_path / "cache" / "latency"
    stored = json.loads(times.path.read_text())
    assert stored["machine"] == lr.measure.machine() and times.conditions in stored

    def no_timing(*args):
        raise AssertionError("a cached time was measured again")

    again = deploy.LayerTimes(batch_size=2, rounds=1, min_run_time=0.001)
    monkeypatch.setattr(again, "_time", no_timing)
    assert again.measure([conv], (4, 6, 6)) == first[:1]
    other = deploy.LayerTimes(batch_size=4, rounds=1, min_run_time=0.001)    # other conditions: not shared
    assert other.seconds == {}
    with pytest.raises(ValueError, match="needs threads=1"):
        deploy.LayerTimes(threads=2, clock="cpu")


def test_latency_table_of_a_small_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    plan = lr.plan(model, "tucker2", 0.4, exclude=["0"], input_size=(3, 8, 8))
    times = deploy.LayerTimes(batch_size=2, rounds=1, min_run_time=0.002)
    table = deploy.latency_table(model, plan, times, input_size=(3, 8, 8))
    row = table.layers["3"]
    assert row["method"] == "tucker2" and row["dense"] > 0 and table.network > 0 and table.scale > 0
    assert (2, 2) in row["ranks"] and all(lr.plans.Layer("3", model[3], "tucker2", (16, 8, 8)).params(r) < 16 * 16 * 9
                                          for r in row["ranks"])
    assert table.predict(plan) > 0
    dense_key = deploy._key(deploy.optimize(model, input_size=(3, 8, 8)), (3, 8, 8))
    assert table.network == times.seconds[dense_key]        # the dense network, as measured
    with pytest.raises(ValueError, match="no LayerTimes"):
        deploy.LatencyTable(table.layers, table.network).calibrate(model, plan, (3, 8, 8))


def test_retain_memory_takes_effect_with_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    try:
        assert deploy.retain_memory(False) is True and deploy.retain_memory() is True
    finally:
        deploy.retain_memory()


def test_latencies_are_measured_side_by_side():
    models = {"a": nn.Linear(8, 8), "b": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))}
    result = lr.measure.latencies(models, 4, (8,), threads=1, rounds=3, min_run_time=0.01, clock="cpu")
    assert set(result) == {"a", "b"} and all(r.clock == "cpu" and r.iqr >= 0 for r in result.values())
    assert "thread CPU time" in str(result["a"])
    with pytest.raises(ValueError, match="clock must be"):
        lr.measure.latency(nn.Linear(8, 8), input_size=(8,), clock="gpu")
