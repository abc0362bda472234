
import pytest
import torch

import lowrank as lr
from lowrank.storage import MissingDataError


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_resnet_loads_published_weights(depth, params):
    model = lr.models.cifar_resnet(depth)
    assert lr.measure.params(model) == params
    assert not model.training
    blank = lr.models.cifar_resnet(depth, pretrained=False)
    assert not torch.equal(model.conv1.weight, blank.conv1.weight)


@pytest.mark.parametrize("depth, floor", [(20, 0.88), (56, 0.90)])
def test_pretrained_accuracy_on_real_images(depth, floor):
    accuracy = lr.measure.accuracy(lr.models.cifar_resnet(depth), lr.data.cifar10("test", limit=300))
    assert accuracy >= floor and accuracy.total == 300


def test_corrupt_checkpoint_is_refused(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    good = lr.storage.data_root() / "checkpoints" / "resnet20-12fca82f.th"
    bad = tmp_path / "checkpoints" / good.name
    bad.write_bytes(good.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match="corrupt"):
        lr.models.resnet20()


def test_missing_checkpoint_without_network_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))  # no earlier download found
    monkeypatch.setattr(lr.models, "URL", "file:///nonexistent/")
    with pytest.raises(MissingDataError, match="checkpoints/resnet32"):
        lr.models.resnet32()


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        lr.models.cifar_resnet(18)


def test_mnist_models_shapes():
    x = torch.zeros(2, 1, 28, 28)
    assert lr.models.mlp((32,))(x).shape == (2, 10)
    assert lr.models.lenet5()(x).shape == (2, 10)
    with pytest.raises(ValueError):
        lr.models.trained_mnist("resnet")
