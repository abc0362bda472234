"""Sequential data-informed compression (lowrank.sequential) and its target (corrected_target)."""
import copy

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.decompose.weighted import corrected_target

from test_informed import correlated_images


def two_convs(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def output_error(a, b, x):
    with torch.no_grad():
        return float((a(x) - b(x)).square().sum())


def test_corrected_target_turns_the_asymmetric_error_into_a_weighted_norm():
    g = torch.Generator().manual_seed(0)
    T, d, n = 4, 6, 500
    W = torch.randn(T, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    Sigma_hat, C = x_hat.T @ x_hat / n, x.T @ x_hat / n
    W_eff, Sigma = corrected_target(W, Sigma_hat, C, ridge=1e-3)
    delta = 1e-3 * Sigma_hat.diagonal().mean()

    def gap(W_tilde):  # E‖W x − W̃ x̂‖² + δ‖W − W̃‖² − ‖(W_eff − W̃) Σ_δ^{1/2}‖²: must not depend on W̃
        lhs = ((x @ W.T - x_hat @ W_tilde.T).square().sum(1).mean() + delta * (W - W_tilde).square().sum())
        E = W_eff - W_tilde
        return float(lhs - torch.trace(E @ Sigma @ E.T))

    gaps = [gap(torch.randn(T, d, generator=g, dtype=torch.float64)) for _ in range(4)]
    assert max(gaps) - min(gaps) < 1e-9 * abs(gaps[0]) + 1e-9


def test_corrected_target_is_the_weight_when_the_input_is_unchanged():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64)
    W_eff, _ = corrected_target(W, x.T @ x / 300, x.T @ x / 300)
    assert torch.allclose(W_eff, W, atol=1e-8)


def test_corrected_target_rejects_bad_input():
    W, S = torch.randn(3, 4), torch.eye(4)
    with pytest.raises(ValueError, match="ridge"):
        corrected_target(W, S, S, ridge=0)
    with pytest.raises(ValueError, match="C must be"):
        corrected_target(W, S, torch.eye(3))
    with pytest.raises(ValueError, match="zero"):
        corrected_target(W, torch.zeros(4, 4), S)


def test_first_layer_alone_is_the_one_shot_compression():
    model, x = two_convs(), correlated_images(n=32)
    plan = lr.plan(model, "svd", {"0": 2}, input_size=(6, 8, 8), norm="data")
    one_shot = lr.compress(model, plan, stats=lr.calibrate(model, x, progress=False), progress=False)
    sequential = lr.compress_sequential(model, plan, x, progress=False)
    with torch.no_grad():
        assert torch.allclose(sequential(x), one_shot(x), atol=1e-4)


@pytest.mark.parametrize("method,ranks", [("svd", {"0": 2, "2": 2}), ("tucker2", {"0": [3, 2], "2": [3, 3]})])
def test_sequential_beats_one_shot_on_the_network_output(method, ranks):
    model, x = two_convs(), correlated_images(n=32)
    plan = lr.plan(model, method, ranks, input_size=(6, 8, 8), norm="data")
    one_shot = lr.compress(model, plan, stats=lr.calibrate(model, x, progress=False), progress=False)
    sequential = lr.compress_sequential(model, plan, x, progress=False)
    assert output_error(model, sequential, x) < output_error(model, one_shot, x)


def test_model_untouched_and_flags_kept():
    model, x = two_convs(), correlated_images(n=16)
    model.train()
    before = copy.deepcopy(model.state_dict())
    plan = lr.plan(model, "svd", {"0": 2, "2": 2}, input_size=(6, 8, 8), norm="data")
    small = lr.compress_sequential(model, plan, x, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules()) and all(m.training for m in small.modules())
    assert isinstance(small[2], lr.layers.ChannelSVDConv2d)


def test_bad_input_raises():
    model, x = two_convs(), correlated_images(n=8)
    plain = lr.plan(model, "svd", {"0": 2}, input_size=(6, 8, 8))
    with pytest.raises(ValueError, match="norm='data'"):
        lr.compress_sequential(model, plain, x, progress=False)
    data_plan = lr.plan(model, "svd", {"0": 2}, input_size=(6, 8, 8), norm="data")
    with pytest.raises(ValueError, match="empty"):
        lr.compress_sequential(model, data_plan, x[:0], progress=False)
    conv = nn.Conv2d(6, 6, 3, padding=1)
    shared = nn.Sequential(conv, nn.ReLU(), conv)     # the same layer runs twice
    plan = lr.plan(shared, "svd", {"0": 2}, input_size=(6, 8, 8), norm="data")
    with pytest.raises(ValueError, match="more than once"):
        lr.compress_sequential(shared, plan, x, progress=False)


class Block(nn.Module):
    """A residual block with in-place ops and one activation module used twice. (Leaky ReLUs:
    applied twice they are not the same, unlike ReLUs, so a stale replay would show.)"""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        out = nn.functional.leaky_relu_(self.bn1(self.conv1(x)), 0.1)    # in place on bn1's output
        out = self.act(self.bn2(self.conv2(out)))
        out += x
        return self.act(out)


def residual_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                        Block(8), Block(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    for m in net.modules():   # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_replaying_frozen_modules_changes_nothing(monkeypatch):
    """Each step replays the unchanged front of the network instead of recomputing it: the
    result must be the same as without."""
    model, x = residual_net(), correlated_images(n=20)
    plan = lr.plan(model, "tucker2", 0.5, exclude=["0", "6"], input_size=(6, 8, 8), norm="data")
    replayed = lr.compress_sequential(model, plan, x, batch_size=8, progress=False)
    calls = []
    monkeypatch.setattr(lr.sequential._Replay, "freeze", lambda self, remaining: calls.append(remaining))
    recomputed = lr.compress_sequential(model, plan, x, batch_size=8, progress=False)
    assert len(calls) == 4          # the four block convs, one step each
    for (k, a), b in zip(replayed.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(replayed(x), recomputed(x))
    assert all("forward" not in vars(m) for m in replayed.modules())   # no wrapper left behind


def test_replay_returns_the_output_of_the_same_input_only():
    net = residual_net()
    replay = lr.sequential._Replay(net)
    runs = []                                    # real runs of block 3 (frozen, wrapped whole)
    net[3].conv1.register_forward_hook(lambda m, a, out: runs.append(1))
    x, z = correlated_images(n=4), correlated_images(n=4, seed=1)
    with torch.no_grad():
        expected = {id(x): net(x), id(z): net(z)}
        runs.clear()
        replay.freeze(["4.conv2"])               # frozen: 0-3, 4.conv1, 4.bn1, 4.act, 5 and 6
        for batch, inputs in [(0, x), (0, x), (1, x), (0, z), (0, x), (0, x)]:
            replay.start(batch)
            assert torch.equal(net(inputs), expected[id(inputs)])
        replay.release()
    assert len(runs) == 4                        # replayed: the second (0, x) and the last one
    assert not replay.wrapped and all("forward" not in vars(m) for m in net.modules())
