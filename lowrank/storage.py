"""Where data and weights live: one data root (read-only to the package) and one user cache."""
import hashlib
import os
from pathlib import Path


class MissingDataError(FileNotFoundError):
    """A data set or weight file is neither in the data root nor downloadable."""


def data_root() -> Path:
    """The data root: ``$LOWRANK_DATA`` if set, else ``~/.cache/lowrank/data``."""
    root = os.environ.get("LOWRANK_DATA")
    return Path(root).expanduser() if root else cache_root() / "data"


def cache_root() -> Path:
    """The user cache for things the package makes (trained MNIST models): ``$LOWRANK_CACHE``,
    else ``$XDG_CACHE_HOME/lowrank``, else ``~/.cache/lowrank``. Never inside the data root."""
    if os.environ.get("LOWRANK_CACHE"):
        return Path(os.environ["LOWRANK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lowrank"


def sha256(path) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing(what: str, offline: str, online: str) -> MissingDataError:
    """The one error for absent data: names the data root and both ways to provide it."""
    return MissingDataError(
        f"{what} not found under the data root {data_root()}.\n"
        f"Fix it either way:\n"
        f"  1. offline: put {offline} there, or point LOWRANK_DATA at a folder that holds it;\n"
        f"  2. online: {online}"
    )
