"""The book's notebooks as committed: executed outputs, no volatile metadata, the setup cell.

    python .ci/notebooks.py execute book/02_svd.ipynb ...   re-run in place (`make outputs`)
    python .ci/notebooks.py repository                      rewrite install lines, URLs (`make repository`)

The repository setting lives in _config.yml (`repository:`); everything here derives from it.
tests/test_book.py checks the committed notebooks with the same functions.
"""
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
SETUP_COMMENT = ("# Setup: on Colab, install this book's package "
                 "(the \"lowrank\" on PyPI is an unrelated project).")
INSTALL = re.compile(r'^(\s*)%pip install -q "lowrank\[book\] @ git\+\S+"$', re.M)
# Where else the repository's URL is written: (file, line pattern, replacement).
METADATA = [("pyproject.toml", r'^Repository = ".*"$', 'Repository = "{url}"'),
            ("pyproject.toml", r'^Issues = ".*"$', 'Issues = "{url}/issues"'),
            ("CITATION.cff", r'^repository-code: ".*"$', 'repository-code: "{url}"')]
# Cell metadata a run writes that says when, not what: dropped from committed notebooks.
VOLATILE_CELL_KEYS = ("execution", "ExecuteTime", "papermill")


def config(root=ROOT) -> dict:
    return yaml.safe_load((Path(root) / "_config.yml").read_text())


def repository(root=ROOT):
    """``(url, branch, path_to_book)`` from _config.yml; the url is https://github.com/ORG/REPO."""
    repo = config(root)["repository"]
    url = repo["url"].rstrip("/")
    parts = urlparse(url)
    if parts.scheme != "https" or parts.netloc != "github.com" or len(parts.path.split("/")) != 3:
        raise ValueError(f"_config.yml repository.url must be https://github.com/ORG/REPO, got {url}")
    return url, repo.get("branch") or "main", (repo.get("path_to_book") or "").strip("/")


def install_line(root=ROOT) -> str:
    """The `%pip install` line of every setup cell: this repository's package, never PyPI's."""
    url, branch, path = repository(root)
    ref = "" if branch == "main" else f"@{branch}"
    sub = f"#subdirectory={path}" if path else ""
    return f'    %pip install -q "lowrank[book] @ git+{url}{ref}{sub}"'


def setup_source(root=ROOT) -> str:
    return "\n".join([SETUP_COMMENT, "import sys", 'if "google.colab" in sys.modules:',
                      install_line(root)])


def chapters(root=ROOT) -> list[Path]:
    """The notebooks in _toc.yml, in reading order."""
    toc = yaml.safe_load((Path(root) / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    files += [s["file"] for part in toc.get("parts", []) for s in part.get("chapters", [])]
    return [Path(root) / f"{f}.ipynb" for f in files if (Path(root) / f"{f}.ipynb").is_file()]


def repository_path(notebook: Path, root=ROOT) -> str:
    """A notebook's path in the repository (the book's root is ``path_to_book`` there)."""
    rel = Path(notebook).resolve().relative_to(Path(root).resolve()).as_posix()
    path = repository(root)[2]
    return f"{path}/{rel}" if path else rel


def colab_url(notebook: Path, root=ROOT) -> str:
    """Colab's URL of a notebook of the repository, as the book's launch button builds it."""
    url, branch, _ = repository(root)
    org_repo = urlparse(url).path.strip("/")
    return (f"https://colab.research.google.com/github/{org_repo}/blob/{branch}/"
            f"{repository_path(notebook, root)}")


def binder_url(notebook: Path, root=ROOT) -> str:
    """mybinder's URL that opens a notebook of the repository in JupyterLab."""
    url, branch, _ = repository(root)
    org_repo = urlparse(url).path.strip("/")
    return (f"https://mybinder.org/v2/gh/{org_repo}/{branch}"
            f"?urlpath=lab/tree/{repository_path(notebook, root)}")


def clean(nb):
    """``nb`` without volatile metadata (timestamps); outputs, execution counts and widget state
    are kept. (nbformat gives a cell without an id one when it reads the notebook.)"""
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
    nb.metadata.pop("papermill", None)
    return nb


def execute(paths):
    """Run each notebook top to bottom in its own folder and write it back without volatile metadata."""
    from nbclient import NotebookClient

    # The kernel inherits this environment: with MPLBACKEND set (CI sets Agg) matplotlib would not
    # use the inline backend, and the committed run would have no figures.
    os.environ.pop("MPLBACKEND", None)
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        print(f"executing {path} ...", flush=True)
        NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(clean(nb), path)


def set_repository(root=ROOT):
    """Rewrite from _config.yml the install line of every chapter's and assignment's setup cell,
    the URLs in pyproject.toml and CITATION.cff's repository-code (`make repository`)."""
    line, changed = install_line(root), []
    notebooks = chapters(root) + sorted(Path(root).glob("assignments/**/*.ipynb"))
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        first = next((c for c in nb.cells if c.cell_type == "code"), None)
        if first is None or not INSTALL.search(first.source):
            raise SystemExit(f"{path}: the first code cell is not the setup cell:\n{setup_source(root)}")
        new = INSTALL.sub(lambda m: line, first.source, count=1)
        if new != first.source:
            first.source = new
            nbformat.write(nb, path)
            changed.append(path)
    url = repository(root)[0]
    for name, pattern, replacement in METADATA:
        path = Path(root) / name
        if path.is_file():
            text = path.read_text()
            new = re.sub(pattern, replacement.format(url=url), text, flags=re.M)
            if new != text:
                path.write_text(new)
                changed.append(path)
    print(f"{len(changed)} files rewritten for {url}: {[str(p) for p in changed]}")


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "execute" and args:
        execute(args)
    elif command == "repository":
        set_repository()
    else:
        raise SystemExit(__doc__)
