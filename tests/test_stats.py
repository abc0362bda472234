"""Layer input statistics: checked against patches built by hand, loop by loop."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowrank as lr
from lowrank.stats import (LayerStats, calibrate, conv_padding, fingerprint, input_vectors, load_stats, patch_gram,
                           patch_sum, save_stats)

# the tiny inputs of most tests give the linear head fewer vectors than its length: that warning
# has its own test (test_too_few_images_warn_with_the_number_each_layer_needs)
pytestmark = pytest.mark.filterwarnings("ignore:.*fewer input vectors than their length")


def brute_patches(x, kernel, stride, dilation, pads):
    """im2col by explicit loops: x [N, S, H, W] → rows [N*Ho*Wo, S*kh*kw] ordered (s, i, j).

    ``pads = (top, bottom, left, right)`` zero padding; positions outside the image read 0.
    """
    N, S, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw), (top, bottom, left, right) = kernel, stride, dilation, pads
    Ho = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + left + right - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for n in range(N):
        for oh in range(Ho):
            for ow in range(Wo):
                row = []
                for s in range(S):
                    for i in range(kh):
                        for j in range(kw):
                            h, w = oh * sh - top + i * dh, ow * sw - left + j * dw
                            inside = 0 <= h < H and 0 <= w < W
                            row.append(x[n, s, h, w] if inside else torch.zeros((), dtype=x.dtype))
                rows.append(torch.stack(row))
    return torch.stack(rows)


def conv_net():
    """Conv with asymmetric kernel/stride/padding/dilation, then a linear on the flat map (float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 9, 5)).double()


def test_brute_patches_reproduce_the_conv():
    """The reference itself: its rows times W.reshape(T, -1)ᵀ give the conv output."""
    torch.manual_seed(1)
    model, x = conv_net(), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    conv = model[0]
    P = brute_patches(x, conv.kernel_size, conv.stride, conv.dilation, (1, 1, 2, 2))
    y = (P @ conv.weight.reshape(4, -1).T + conv.bias).reshape(2, 3, 9, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, conv(x))
    torch.testing.assert_close(input_vectors(conv, x), P)


def test_conv_and_linear_statistics_equal_brute_force():
    torch.manual_seed(2)
    model, x = conv_net(), torch.randn(5, 3, 7, 6, dtype=torch.float64)
    stats = calibrate(model, x, batch_size=2, progress=False)
    assert list(stats) == ["0", "3"]

    conv = model[0]
    P = brute_patches(x, conv.kernel_size, conv.stride, conv.dilation, (1, 1, 2, 2))
    s = stats["0"]
    assert s.count == 5 * 3 * 9 and s.dim == 3 * 3 * 2
    assert s.second_moment.dtype == torch.float64
    torch.testing.assert_close(s.second_moment, P.T @ P / len(P))
    torch.testing.assert_close(s.mean, P.mean(0))
    torch.testing.assert_close(s.sigma, s.second_moment)

    Z = torch.relu(conv(x)).flatten(1)
    s = stats["3"]
    assert s.count == 5 and s.dim == 4 * 3 * 9
    torch.testing.assert_close(s.second_moment, Z.T @ Z / 5)
    torch.testing.assert_close(s.mean, Z.mean(0))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_is_asymmetric_like_pytorch():
    """padding='same' with an even kernel pads one more on the right, as PyTorch's conv does."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, (3, 4), padding="same", dilation=(2, 1)).double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    P = brute_patches(x, conv.kernel_size, conv.stride, conv.dilation, (2, 2, 1, 2))
    y = (P @ conv.weight.reshape(3, -1).T + conv.bias).reshape(2, 5, 6, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, conv(x))
    s = calibrate(nn.Sequential(conv), x, layers=["0"], progress=False)["0"]  # not factorizable: asked for
    torch.testing.assert_close(s.second_moment, P.T @ P / len(P))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride", [1, 2])
def test_padding_modes_pad_as_the_conv_does(mode, stride):
    """reflect/replicate/circular padding: the patches of the input padded in that mode (both the
    shift-structured stride-1 Gram and the patch matrix)."""
    torch.manual_seed(9)
    conv = nn.Conv2d(2, 3, (3, 2), stride=stride, padding=(1, 2), padding_mode=mode).double()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    P = brute_patches(F.pad(x, (2, 2, 1, 1), mode=mode), conv.kernel_size, conv.stride, conv.dilation, (0,) * 4)
    y = (P @ conv.weight.reshape(3, -1).T + conv.bias).reshape(2, *conv(x).shape[2:], 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, conv(x))
    torch.testing.assert_close(input_vectors(conv, x), P)
    torch.testing.assert_close(patch_gram(conv, x), P.T @ P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patch_sum(conv, x)[0], P.sum(0))
    s = calibrate(nn.Sequential(conv), x, progress=False)["0"]
    torch.testing.assert_close(s.second_moment, P.T @ P / len(P))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 1, 0, 1), ((3, 2), 1, (2, 0), (2, 1)), (3, 1, 4, 1), ((2, 4), 1, "same", (1, 2)),
    (1, 1, 0, 1), ((5, 3), 1, (1, 3), 1), (3, 2, 1, 1), ((3, 2), (2, 1), (1, 2), (2, 1))])
def test_patch_gram_equals_the_patch_matrix_product(kernel, stride, padding, dilation):
    """Stride-1 convs take the shift-structured path (every padding: none, less or more than the
    kernel, 'same' with an even kernel); the rest X.T @ Y. Both against loop-built patches."""
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 2, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x, y = torch.randn(2, 2, 3, 7, 9, dtype=torch.float64).unbind(0)
    left, right, top, bottom = conv_padding(conv)
    X, Y = (brute_patches(z, conv.kernel_size, conv.stride, conv.dilation, (top, bottom, left, right))
            for z in (x, y))
    torch.testing.assert_close(patch_gram(conv, x), X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patch_gram(conv, x, y), X.T @ Y, rtol=1e-12, atol=1e-12)
    total, count = patch_sum(conv, x)
    torch.testing.assert_close(total, X.sum(0))
    assert count == len(X)
    low = patch_gram(conv.float(), x.bfloat16())          # low precision is accumulated in float32
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), X.T @ X, rtol=2e-2, atol=2e-2 * float((X.T @ X).abs().max()))


def test_linear_flattens_leading_dims_and_float32_is_close():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 3))
    x = torch.randn(4, 7, 6)
    s = calibrate(model, x, progress=False)["0"]
    X = x.double().reshape(-1, 6)
    assert s.count == 28
    torch.testing.assert_close(s.second_moment, X.T @ X / 28, rtol=1e-6, atol=1e-6)


def test_covariance_matches_torch_cov():
    torch.manual_seed(5)
    model, x = conv_net(), 3 + torch.randn(4, 3, 7, 6, dtype=torch.float64)
    s = calibrate(model, x, centered=True, progress=False)["0"]
    conv = model[0]
    P = brute_patches(x, conv.kernel_size, conv.stride, conv.dilation, (1, 1, 2, 2))
    torch.testing.assert_close(s.covariance, torch.cov(P.T, correction=0))
    torch.testing.assert_close(s.sigma, s.covariance)
    assert not torch.allclose(s.covariance, s.second_moment)


def test_tensor_dataset_and_loader_agree_and_limit_counts_samples():
    torch.manual_seed(6)
    model, x = conv_net(), torch.randn(7, 3, 7, 6, dtype=torch.float64)
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(7, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    reference = calibrate(model, x[:5], batch_size=5, progress=False)
    for data in (x, dataset, loader):
        stats = calibrate(model, data, batch_size=2, limit=5, progress=False)
        for name, s in stats.items():
            assert s.count == reference[name].count
            torch.testing.assert_close(s.second_moment, reference[name].second_moment)
            torch.testing.assert_close(s.mean, reference[name].mean)


def test_layers_argument_selects_layers():
    model, x = conv_net(), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    assert list(calibrate(model, x, layers=["3"], progress=False)) == ["3"]


def test_model_is_left_unchanged():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    model.train()
    model[2].eval()  # a mixed state must come back as it was, module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    calibrate(model, torch.randn(6, 3, 6, 6), batch_size=4, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_save_and_load_round_trip(tmp_path):
    model, x = conv_net(), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    stats = calibrate(model, x, centered=True, progress=False)
    save_stats(stats, tmp_path / "stats.pt")
    loaded = load_stats(tmp_path / "stats.pt")
    assert list(loaded) == list(stats)
    for name, s in stats.items():
        t = loaded[name]
        assert isinstance(t, LayerStats) and t.count == s.count and t.centered
        assert torch.equal(t.second_moment, s.second_moment) and torch.equal(t.mean, s.mean)


def test_errors():
    model, x = conv_net(), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, x[:0], progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, torch.utils.data.TensorDataset(x[:0]), progress=False)
    with pytest.raises(ValueError, match="no layer named 'head'"):
        calibrate(model, x, layers=["head"], progress=False)
    with pytest.raises(ValueError, match="ReLU"):
        calibrate(model, x, layers=["1"], progress=False)
    with pytest.raises(ValueError, match="limit"):
        calibrate(model, x, limit=0, progress=False)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(RuntimeError, match="never reached.*head"):
        calibrate(Unused(), torch.randn(4, 3), layers=["body", "head"], progress=False)
    assert list(calibrate(Unused(), torch.randn(4, 3), progress=False)) == ["body"]  # by default: skipped

    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    model.train()
    with pytest.raises(ValueError, match="layer '0'.*NaN"):
        calibrate(model, bad, progress=False)
    assert model.training and all(not m._forward_hooks for m in model.modules())

    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="layer '0'.*groups=2"):
        calibrate(grouped, torch.randn(1, 4, 5, 5), layers=["0"], progress=False)
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear layer that the factorizations support"):
        calibrate(grouped, torch.randn(1, 4, 5, 5), progress=False)
    images = (torch.rand(2, 3, 7, 6) * 255).to(torch.uint8)
    for data in (images, torch.utils.data.TensorDataset(images, torch.zeros(2))):
        with pytest.raises(ValueError, match="uint8.*normalise them to float"):
            calibrate(model, data, progress=False)


class Attention(nn.Module):
    """Multi-head attention (whose out_proj is an nn.Linear subclass its forward never calls),
    a depthwise conv and a Linear subclass: none factorizable; a conv and a linear that are."""

    def __init__(self):
        super().__init__()
        self.conv, self.depthwise = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.special = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.depthwise(self.conv(x)).flatten(2).transpose(1, 2)        # [N, H·W, 8]
        return self.head(self.special(self.attention(tokens, tokens, tokens)[0]).mean(1))


def test_default_layers_are_those_the_factorizations_support():
    torch.manual_seed(10)
    model, x = Attention().double(), torch.randn(3, 3, 6, 6, dtype=torch.float64)
    assert list(calibrate(model, x, progress=False)) == ["conv", "head"]


def test_a_plan_calibrates_exactly_its_factorized_layers():
    torch.manual_seed(11)
    model, x = Attention().double(), torch.randn(3, 3, 6, 6, dtype=torch.float64)
    plan = lr.plan(model, "svd", 2, input_size=(3, 6, 6), norm="data", exclude=["head"])
    assert plan.compressed() == ["conv"]
    for stats in (calibrate(model, x, plan, progress=False), calibrate(model, x, layers=plan, progress=False)):
        assert list(stats) == ["conv"]
        torch.testing.assert_close(stats["conv"].second_moment, calibrate(model, x, ["conv"], progress=False)[
            "conv"].second_moment)
    other = lr.plan(nn.Sequential(nn.Conv2d(3, 8, 3)), "svd", 2, norm="data")
    with pytest.raises(ValueError, match="does not have"):
        calibrate(model, x, other, progress=False)


def test_too_few_images_warn_with_the_number_each_layer_needs():
    """One image gives a linear head one vector: Σ [144, 144] of rank 1. The warning says how many
    images each short layer needs, and nothing is said when there are enough."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))   # conv: 36 ≥ 27 a image
    with pytest.warns(UserWarning, match=r"^1 image gives.*for 1 of 2 layers.*2 needs 144 \(d = 144, 1 vectors "
                                         r"per image\).*at least 144 images"):
        calibrate(model, torch.randn(1, 3, 8, 8), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(model, torch.randn(144, 3, 8, 8), progress=False)
        calibrate(model, torch.randn(1, 3, 8, 8), layers=["0"], progress=False)


def test_statistics_record_the_weights_they_were_calibrated_on(tmp_path):
    model, x = conv_net(), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    stats = calibrate(model, x, progress=False)
    assert stats["0"].fingerprint == fingerprint(model[0].weight)
    save_stats(stats, tmp_path / "stats.pt")
    assert load_stats(tmp_path / "stats.pt")["0"].fingerprint == stats["0"].fingerprint
    assert fingerprint(model[0].weight * 1.001) != stats["0"].fingerprint


@pytest.mark.slow
def test_pretrained_resnet20_on_cifar10():
    """Real weights, real images: Σ is symmetric PSD, d = S·9 for the 3×3 convs."""
    import lowrank

    model = lowrank.models.resnet20(pretrained=True)
    stats = calibrate(model, lowrank.data.cifar10("test", limit=64), batch_size=32, progress=False)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert list(stats) == list(convs) + ["linear"]
    for name, conv in convs.items():
        s = stats[name]
        side = 16 if name.startswith("layer2") else 8 if name.startswith("layer3") else 32
        assert s.dim == conv.in_channels * 9 and s.count == 64 * side * side
        sigma = s.sigma
        assert torch.equal(sigma, sigma.T)
        eig = torch.linalg.eigvalsh(sigma)
        assert eig.min() >= -1e-9 * eig.max() and eig.max() > 0
    assert stats["linear"].dim == 64 and stats["linear"].count == 64
    # conv1 (3x3, padding 1, stride 1): each patch's centre tap visits every pixel exactly once
    images = torch.stack([img for img, _ in lowrank.data.cifar10("test", limit=64)]).double()
    centre = [c * 9 + 4 for c in range(3)]
    s = stats["conv1"]
    torch.testing.assert_close(s.mean[centre], images.mean((0, 2, 3)))
    torch.testing.assert_close(s.second_moment[centre][:, centre],
                               torch.einsum("nchw,ndhw->cd", images, images) / (64 * 32 * 32),
                               rtol=1e-5, atol=1e-6)  # batch Grams are float32 like the model
