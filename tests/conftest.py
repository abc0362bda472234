import os

import pytest

from lowrank.storage import data_root


def pytest_configure(config):
    if os.environ.get("LOWRANK_DATA") and not (data_root() / "checkpoints").is_dir():
        raise pytest.UsageError(
            f"LOWRANK_DATA={data_root()} holds no checkpoints/: point it at the book's data folder "
            "(see README.md), or unset it to download the data on a machine with internet access")
