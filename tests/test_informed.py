"""Data-informed factorized layers (lowrank.informed): synthetic layers, correlated inputs."""
import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.decompose.weighted import ridged, weighted_error, weighted_svd
from lowrank.informed import factorize
from lowrank.layers import ChannelSVDConv2d, LowRankLinear, Tucker2Conv2d


def correlated_images(n=24, S=6, size=8, latent=3, seed=0):
    """Inputs [n, S, size, size] that live near a few smooth directions (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(S, latent, generator=g)
    z = torch.randn(n, latent, size // 2, size // 2, generator=g)
    z = nn.functional.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
    return torch.einsum("sl,nlhw->nshw", mix, z) + 0.01 * torch.randn(n, S, size, size, generator=g)


def setup(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    x = correlated_images(seed=seed)
    stats = lr.calibrate(nn.Sequential(conv), x, progress=False)["0"]
    return conv, x, stats


def output_error(dense, small, x):
    with torch.no_grad():
        return float((dense(x) - small(x)).square().sum())


def entry(method, rank):
    return {"method": method, "rank": list(rank) if isinstance(rank, tuple) else rank}


def test_svd_layer_is_the_weighted_svd():
    conv, x, stats = setup()
    layer = factorize(conv, entry("svd", 3), stats.sigma)
    A, B = weighted_svd(conv.weight.detach().reshape(8, -1), stats.sigma, 3)
    assert isinstance(layer, ChannelSVDConv2d)
    assert torch.allclose(layer.weight.reshape(8, -1), A @ B, atol=1e-5)
    assert torch.equal(layer.bias, conv.bias)


@pytest.mark.parametrize("method,rank", [("svd", 8), ("tucker2", (8, 6))])
def test_full_rank_reproduces_the_layer(method, rank):
    conv, x, stats = setup()
    layer = factorize(conv, entry(method, rank), stats.sigma)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-4)


@pytest.mark.parametrize("method,rank,cls", [("svd", 2, ChannelSVDConv2d),
                                             ("tucker2", (3, 2), Tucker2Conv2d)])
def test_weighted_beats_plain_on_the_calibration_inputs(method, rank, cls):
    conv, x, stats = setup()
    plain = cls.from_dense(conv, rank)
    informed = factorize(conv, entry(method, rank), stats.sigma, n_iter=10)
    assert output_error(conv, informed, x) < 0.9 * output_error(conv, plain, x)


def test_linear_layer():
    torch.manual_seed(1)
    linear = nn.Linear(12, 5)
    x = torch.randn(200, 3) @ torch.randn(3, 12) + 0.01 * torch.randn(200, 12)
    stats = lr.calibrate(nn.Sequential(linear), x, progress=False)["0"]
    layer = factorize(linear, entry("svd", 2), stats.sigma)
    assert isinstance(layer, LowRankLinear)
    plain = LowRankLinear.from_dense(linear, 2)
    assert output_error(linear, layer, x) < 0.5 * output_error(linear, plain, x)


def test_bad_input_raises():
    conv, x, stats = setup()
    with pytest.raises(ValueError, match="no data-informed version"):
        factorize(conv, entry("spatial", 2), stats.sigma)
    other = lr.calibrate(nn.Sequential(nn.Conv2d(6, 8, 1)), x, progress=False)["0"]
    with pytest.raises(ValueError, match="do not fit"):
        factorize(conv, entry("svd", 2), other.sigma)


def test_compress_with_a_data_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = correlated_images()
    plan = lr.plan(model, "tucker2", {"0": [3, 2], "2": [3, 3]}, input_size=(6, 8, 8), norm="data")
    with pytest.raises(ValueError, match="statistics"):
        lr.compress(model, plan, progress=False)
    stats = lr.calibrate(model, x, progress=False)
    small = lr.compress(model, plan, stats=stats, progress=False, n_iter=5)
    plain = lr.compress(model, lr.plan(model, "tucker2", {"0": [3, 2], "2": [3, 3]}, input_size=(6, 8, 8)),
                        progress=False)
    assert all(isinstance(small[i], Tucker2Conv2d) for i in (0, 2))
    assert output_error(model, small, x) < output_error(model, plain, x)


def test_ridge_trades_output_error_for_weight_error():
    conv, x, stats = setup()
    W = conv.weight.detach().reshape(8, -1).double()
    errors = []
    for ridge in (0.0, 1e-3, 1e-1):
        Sigma = ridged(stats.sigma, ridge)
        assert torch.allclose(Sigma - stats.sigma, ridge * stats.sigma.diagonal().mean() * torch.eye(54, dtype=torch.float64))
        A, B = weighted_svd(W, Sigma, 3)
        errors.append(((A @ B - W).norm(), weighted_error(W, A @ B, stats.sigma)))
    assert errors[0][0] >= errors[1][0] >= errors[2][0]          # weight error falls with the ridge
    assert errors[0][1] <= errors[1][1] <= errors[2][1]          # output error rises with it
    with pytest.raises(ValueError, match="ridge"):
        ridged(stats.sigma, -1.0)


def test_compress_uses_the_ridged_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)).eval()
    x = correlated_images()
    stats = lr.calibrate(model, x, progress=False)
    plan = lr.plan(model, "svd", {"0": 3}, input_size=(6, 8, 8), norm="data")
    for ridge in (0.0, 0.1):
        small = lr.compress(model, plan, stats=stats, ridge=ridge, progress=False)
        expected = factorize(model[0], plan["0"], ridged(stats["0"].sigma, ridge))
        assert torch.allclose(small[0].weight, expected.weight)
