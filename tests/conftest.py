import os

import pytest
import torch

import lowrank as lr
from lowrank.storage import data_root


def pytest_configure(config):
    if os.environ.get("LOWRANK_DATA") and not (data_root() / "checkpoints").is_dir():
        raise pytest.UsageError(
            f"LOWRANK_DATA={data_root()} holds no checkpoints/: point it at the book's data folder "
            "(see README.md), or unset it to download the data on a machine with internet access")


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors and models of the unit tests are small: one thread is faster and steadier
    than two waiting on each other, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet20():
    """The pretrained CIFAR-10 ResNet-20 (do not modify it in a test)."""
    return lr.models.resnet20()


@pytest.fixture(scope="module")
def images():
    """The first 16 CIFAR-10 test images [16, 3, 32, 32], normalised."""
    return torch.stack([lr.data.cifar10("test", limit=16)[i][0] for i in range(16)])
