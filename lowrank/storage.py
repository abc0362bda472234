"""Where data and weights live: one data root (read-only to the package) and one user cache.

What the data root lacks is looked for, and downloaded, in the download folder of the user cache
(:func:`download_root`); the package never writes into a data root the user set.
"""
import hashlib
import os
from pathlib import Path


class MissingDataError(FileNotFoundError):
    """A data set or weight file is neither in the data root nor downloadable."""


class CorruptDataError(RuntimeError):
    """A data or weight file is there but cannot be used: truncated, altered or unreadable."""


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


def download_root() -> Path:
    """Where the package downloads what the data root lacks: ``cache_root() / "data"`` (the data
    root itself when ``LOWRANK_DATA`` is unset). A data root that the user set is never written."""
    return cache_root() / "data"


def find(relative: str) -> Path | None:
    """``relative`` (a file or folder) in the data root, else in the download folder, else None."""
    for root in dict.fromkeys([data_root(), download_root()]):
        if (root / relative).exists():
            return root / relative
    return None


def fetch(relative: str, url: str, digest: str, what: str) -> Path:
    """The file ``relative`` whose sha256 is ``digest``: from the data root or the download folder
    (:func:`find`), else downloaded from ``url`` into the download folder; checked either way."""
    import torch.hub

    path = find(relative)
    if path is None:
        path = download_root() / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=digest, progress=False)
        except Exception as error:  # no network, no permission, a changed file: say what to do
            raise missing(what, relative, f"with internet access it is downloaded from {url} "
                          f"into {download_root()}") from error
    if sha256(path) != digest:
        raise corrupt(path, f"its sha256 is not {digest}",
                      f"delete it and download it again from {url}")
    return path


def benchmark_result(name: str) -> Path:
    """The file ``benchmarks/results/<name>`` that the book's benchmark scripts write: from the
    clone the working directory is in (or above it: the chapters run in ``book/``), else
    downloaded once from the repository in the package's metadata (``Project-URL: Repository``,
    its default branch) into ``cache_root() / "results"`` — for a chapter opened alone, on Colab.
    Raises MissingDataError (naming the file and the address) when neither works."""
    from importlib.metadata import PackageNotFoundError, metadata

    relative = Path("benchmarks") / "results" / name
    for folder in [Path.cwd(), *Path.cwd().parents]:
        if (folder / relative).is_file():
            return folder / relative
    path = cache_root() / "results" / name
    if path.is_file():
        return path
    try:
        urls = dict(u.split(", ", 1) for u in metadata("lowrank").get_all("Project-URL") or [])
        repository = urls["Repository"]
    except (PackageNotFoundError, KeyError, ValueError):
        repository = "https://github.com/<the book's repository>"
    url = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + f"/HEAD/{relative}"
    try:
        import torch.hub

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as error:
        raise MissingDataError(
            f"{relative} is not in a clone above {Path.cwd()}, and downloading it from {url} failed "
            f"({type(error).__name__}). Run the chapter inside a clone of the book's repository, "
            f"or put the file at {path}.") from error
    return path


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


def corrupt(path, reason: str, fix: str) -> CorruptDataError:
    """The one error for an unusable file: names the file, what is wrong, and what to do."""
    return CorruptDataError(f"{path} is corrupt or truncated ({reason}).\nFix it: {fix}.")
