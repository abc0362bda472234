import pytest
import torch

import lowrank as lr
from lowrank.storage import MissingDataError, sha256


def test_offline_files_match_their_checksums():
    root = lr.storage.data_root()
    sums = dict(line.split(maxsplit=1)[::-1] for line in (root / "SHA256SUMS").read_text().splitlines())
    for name in ["cifar10-offline/test.npz", "cifar10-offline/train.npz", "MNIST/raw/t10k-images-idx3-ubyte"]:
        assert sha256(root / name) == sums[name]


def test_cifar10_items_are_normalised_real_images():
    test = lr.data.cifar10("test")
    assert len(test) in (1017, 10000)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 3  # the first official test image is a cat
    assert -2.2 < x.min() < x.max() < 2.7
    assert len(lr.data.cifar10("test", limit=100)) == 100


def test_cifar10_augmentation_changes_images_but_not_labels():
    plain, augmented = lr.data.cifar10("train", limit=8), lr.data.cifar10("train", limit=8, augment=True)
    torch.manual_seed(0)
    pairs = [(plain[i], augmented[i]) for i in range(8)]
    assert all(a[1] == b[1] for a, b in pairs)
    assert any(not torch.equal(a[0], b[0]) for a, b in pairs)


def test_mnist_and_imagenet_sample():
    x, y = lr.data.mnist("test")[0]
    assert x.shape == (1, 28, 28) and y == 7
    assert len(lr.data.mnist("train")) == 60000
    sample = lr.data.imagenet_sample(32)
    assert len(sample) == 1000
    x, y = sample[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert sample[999][1] == 999


@pytest.mark.parametrize("call", [lambda: lr.data.cifar10("valid"), lambda: lr.data.cifar10(limit=0),
                                  lambda: lr.data.mnist("dev"), lambda: lr.data.imagenet_sample(3)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    for call in [lambda: lr.data.cifar10(download=False), lambda: lr.data.mnist(download=False),
                 lambda: lr.data.imagenet_sample()]:
        with pytest.raises(MissingDataError) as error:
            call()
        assert str(tmp_path) in str(error.value) and "LOWRANK_DATA" in str(error.value)
