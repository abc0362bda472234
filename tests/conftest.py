import os

import pytest
import torch

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
