"""plan / compress / structure / save / load on torchvision architectures the book never uses, and
on the package's EfficientNet-Lite0 (whose convs pad in their own forward).

The models are built WITHOUT weights (random initialisation, float64) and run on random 32×32
inputs: these tests check exactness at full rank, that plan costs equal the built model's, and
that the layers a plan cannot factorize are listed with the reason, nothing about accuracy.
Full rank is applied to a part of the larger models (``include``) to keep the suite fast.
"""
import pytest
import torch
import torch.nn as nn
import torchvision.models as tm

import lowrank as lr


def vit():
    """vit_b_16's architecture (torchvision's VisionTransformer) at a small size; its zero-initialised
    head made random so that the output says something."""
    model = tm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


#: name → (constructor, layers factorized at full rank (None: all), {reason: number of layers skipped for it})
ARCHITECTURES = {
    "resnet18": (lambda: tm.resnet18(num_classes=10), ["conv1", "layer1.*", "layer2.0.*", "fc"], {}),
    "mobilenet_v2": (lambda: tm.mobilenet_v2(num_classes=10), None, {"grouped convolutions": 17}),
    "efficientnet_b0": (lambda: tm.efficientnet_b0(num_classes=10), ["features.[0-3].*", "classifier.*"],
                        {"grouped convolutions": 16}),
    "densenet121": (lambda: tm.densenet121(num_classes=10), ["features.conv0", "features.denseblock1.*",
                                                            "classifier"], {}),
    "convnext_tiny": (lambda: tm.convnext_tiny(num_classes=10), ["features.[01].*", "classifier.*"],
                      {"grouped convolutions": 18}),
    "vit": (vit, None, {"attention: nn.MultiheadAttention": 2, "projection inside nn.MultiheadAttention": 2}),
    "mobilenet_v3_small": (lambda: tm.mobilenet_v3_small(num_classes=10), None, {"grouped convolutions": 11}),
    "efficientnet_lite0": (lambda: lr.models.efficientnet_lite0(pretrained=False), ["_blocks.[0-3].*", "_conv_head"],
                           {"grouped convolutions": 16, "Conv2dStaticSamePadding is a subclass of nn.Conv2d": 1}),
}


def build(name, seed=0):
    if name == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(seed)
    return ARCHITECTURES[name][0]().eval().double()


def inputs(n=2):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_full_rank_round_trip_is_exact_and_costs_match(name, tmp_path):
    _, include, skipped = ARCHITECTURES[name]
    model = build(name)
    candidates = [n for n, m in model.named_modules() if isinstance(m, lr.plans.CANDIDATES)]
    # at full rank no factorization saves parameters: the plan keeps every layer dense, and says so;
    # the plan is then edited by hand into channel SVDs at that rank (its costs are recomputed)
    plan = lr.plan(model, "svd", lambda layer: layer.full_rank(), include=include)
    assert plan.compressed() == [] and all("would need" in e["note"] for e in plan.layers.values())
    for e in plan.layers.values():
        e["method"] = "svd"
    text = str(plan)
    assert all(e["note"].startswith("saves nothing") for e in plan.layers.values())
    assert set(plan) | set(plan.skipped) == set(candidates) and not set(plan) & set(plan.skipped)
    for reason, count in skipped.items():
        listed = [n for n, s in plan.skipped.items() if s["reason"].startswith(reason)]
        assert len(listed) == count
        assert all(any(line.startswith(n + " ") and "skipped" in line and reason in line
                       for line in text.splitlines()) for n in listed)
    dense = len(plan.skipped)
    assert text.splitlines()[-1].startswith(f"{len(candidates)} layers: {len(plan)} factorized, {dense} kept dense")

    small = lr.compress(model, plan, progress=False)
    x = inputs()
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    assert plan.params == lr.measure.params(small) and plan.macs == lr.measure.macs(small)

    lr.save(tmp_path / "small.pt", small, plan)
    again, plan_again = lr.load(tmp_path / "small.pt", build(name, seed=1))   # other (random) dense weights
    assert plan_again == plan
    with torch.no_grad():
        assert torch.equal(again(x), got)


@pytest.mark.filterwarnings("ignore:.*fewer input vectors")   # 8 images: the last layers see 8 vectors
@pytest.mark.parametrize("name", ["mobilenet_v2", "vit"])
def test_data_informed_compression_calibrates_what_the_plan_factorizes(name):
    model = build(name)
    plan = lr.plan(model, "svd", 0.5, norm="data")
    x = inputs(8)
    default = lr.calibrate(model, x, progress=False)       # every layer the factorizations support
    assert list(default) == list(plan) and not set(default) & set(plan.skipped)
    plan = lr.plan(model, "svd", 0.5, norm="data", exclude=["features.1*", "encoder.layers.encoder_layer_1.*"])
    stats = lr.calibrate(model, x, plan, progress=False)
    assert list(stats) == plan.compressed() and len(stats) < len(default)
    assert all(torch.equal(stats[n].second_moment, default[n].second_moment) for n in stats)
    small = lr.compress(model, plan, stats, progress=False)
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()
    assert lr.measure.params(small) == plan.params


def test_sequential_compression_at_full_rank_reproduces_efficientnet_lite0():
    """Error feedback through EfficientNet-Lite0's pointwise convs (blocks in a ModuleList, called
    with keyword arguments): at full rank each layer is fitted to an unchanged input, so the
    compressed model computes what the dense one does."""
    model = build("efficientnet_lite0")
    plan = lr.plan(model, "svd", lambda layer: layer.full_rank(), include=["_blocks.[0-2].*"], norm="data")
    for e in plan.layers.values():
        e["method"] = "svd"
    small = lr.compress_sequential(model, plan, inputs(4), progress=False)
    assert [n for n, m in small.named_modules() if isinstance(m, lr.layers.ChannelSVDConv2d)] == list(plan)
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(small(x), expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
