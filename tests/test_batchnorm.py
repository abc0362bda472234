import copy

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.batchnorm import fold_bn, recalibrate_bn


def trained_bn(channels, seed):
    """A BatchNorm2d with non-trivial affine weights and running statistics."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(1 + torch.rand(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=g))
    return bn


class Branchy(nn.Module):
    """conv→bn (foldable), conv→(bn and relu) (not foldable: the conv has two users)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), trained_bn(8, 0)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), trained_bn(8, 1)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        z = self.conv2(y)
        return self.bn2(z) + torch.relu(z)


def test_fold_bn_is_exact_and_leaves_the_model_alone():
    model = Branchy().double().eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_bn(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x))
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    assert isinstance(folded.bn2, nn.BatchNorm2d)          # conv2 has two users: kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_bn_into_the_last_factor_of_a_compressed_resnet():
    model = lr.models.resnet20()
    plan = lr.plan(model, "tucker2", 0.5, exclude=["conv1", "linear"])
    small = lr.compress(model.double(), plan, progress=False)
    folded = fold_bn(small)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.layer1[0].conv1.config["bias"] and folded.layer1[0].conv1.last.bias is not None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(folded(x), small(x))


def test_fold_bn_errors():
    with pytest.raises(ValueError, match="nothing to fold"):
        fold_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx"):
        fold_bn(Untraceable())


def test_recalibrate_bn_matches_the_statistics_of_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), trained_bn(4, 2)).eval()
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    new = recalibrate_bn(model, x, limit=None, batch_size=64)   # one batch: exact statistics
    y = model[0](x).detach()
    torch.testing.assert_close(new[1].running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(new[1].running_var, y.var((0, 2, 3), unbiased=True))
    assert new[1].momentum == model[1].momentum and not new.training and not new[1].training
    torch.testing.assert_close(new[1].weight, model[1].weight)
    assert not torch.equal(model[1].running_mean, new[1].running_mean)   # the model is untouched


def test_recalibrate_bn_uses_limit_and_rejects_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(50, 3, 8, 8)
    a = recalibrate_bn(model, x, limit=20, batch_size=8)
    b = recalibrate_bn(model, x[:20], limit=None, batch_size=8)
    torch.testing.assert_close(a[1].running_var, b[1].running_var)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="empty"):
        recalibrate_bn(model, x[:0])
