"""The committed chapters as a reader gets them: the setup cell, the committed run, the links."""
import copy
import importlib.util
import json
import warnings
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("notebooks", ROOT / ".ci" / "notebooks.py")
notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks)
KNOWN = yaml.safe_load((ROOT / ".ci" / "known_failures.yml").read_text()) or {}
CHAPTERS = notebooks.chapters()


@pytest.fixture(params=CHAPTERS, ids=[c.stem for c in CHAPTERS])
def chapter(request):
    return request.param


def read(path):
    with warnings.catch_warnings():  # a cell without an id: test_no_volatile_metadata says so
        warnings.simplefilter("ignore", nbformat.validator.MissingIDFieldWarning)
        return nbformat.read(path, as_version=4)


def code_cells(path):
    return [c for c in read(path).cells if c.cell_type == "code"]


def known(request, check, chapter):
    """Mark a failure listed in .ci/known_failures.yml as expected; strict, so a fixed chapter
    that is still listed fails and the list gets emptied."""
    if chapter.stem in KNOWN.get(check, []):
        request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"known failure '{check}' listed in .ci/known_failures.yml"))


def test_the_toc_lists_every_chapter():
    on_disk = sorted(p.name for p in (ROOT / "book").glob("[0-9]*.ipynb"))
    assert sorted(p.name for p in CHAPTERS) == on_disk


def test_setup_cell_comes_first_with_the_configured_install_line(chapter):
    first = code_cells(chapter)[0]
    assert first.source == notebooks.setup_source(), (
        f"{chapter.name}: the first code cell must be the setup cell (run `make repository`):\n"
        f"{notebooks.setup_source()}")


def test_colab_url_points_at_the_configured_repository(chapter):
    url, branch, path = notebooks.repository()
    colab = urlparse(notebooks.colab_url(chapter))
    assert colab.scheme == "https" and colab.netloc == "colab.research.google.com"
    assert not colab.query and not colab.fragment and "//" not in colab.path
    _, github, org, repo, blob, ref, *rest = colab.path.split("/")
    assert (github, blob, ref) == ("github", "blob", branch)
    assert f"https://github.com/{org}/{repo}" == url
    assert "/".join(rest) == notebooks.repository_path(chapter)
    assert ROOT.joinpath(*rest[len(Path(path).parts):]) == chapter and chapter.is_file()


def test_install_line_and_colab_url_follow_the_config(tmp_path):
    """Changing _config.yml's repository is all a publisher does: `make repository` then
    rewrites the install lines, and the Colab URLs follow."""
    config = notebooks.config()
    config["repository"].update(url="https://github.com/someone/fork", branch="dev")
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump({"root": "book/intro",
                                                       "chapters": [{"file": "book/01_x"}]}))
    (tmp_path / "book").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(notebooks.setup_source())])
    nbformat.write(nb, tmp_path / "book" / "01_x.ipynb")
    for name in ("pyproject.toml", "CITATION.cff"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    notebooks.set_repository(tmp_path)
    first = read(tmp_path / "book" / "01_x.ipynb").cells[0].source
    assert first.endswith('%pip install -q "lowrank[book] @ git+https://github.com/someone/fork@dev"')
    assert first == notebooks.setup_source(tmp_path) != notebooks.setup_source()
    assert notebooks.colab_url(tmp_path / "book" / "01_x.ipynb", tmp_path) == (
        "https://colab.research.google.com/github/someone/fork/blob/dev/book/01_x.ipynb")
    assert urls(tmp_path) == {"Repository": "https://github.com/someone/fork",
                              "Issues": "https://github.com/someone/fork/issues",
                              "repository-code": "https://github.com/someone/fork"}


def urls(root):
    """The repository URLs written in pyproject.toml and CITATION.cff."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]
    citation = yaml.safe_load((root / "CITATION.cff").read_text())
    return {**project, "repository-code": citation["repository-code"]}


def test_package_metadata_names_the_configured_repository():
    url = notebooks.repository()[0]
    assert urls(ROOT) == {"Repository": url, "Issues": f"{url}/issues", "repository-code": url}


def test_no_nbval_comments(chapter):
    lines = [line for c in code_cells(chapter) for line in c.source.splitlines() if "# NBVAL_" in line]
    assert not lines, f"{chapter.name}: nbval markers belong in cell tags, not comments: {lines}"


def test_code_lines_fit_the_page(request, chapter):
    known(request, "code-lines", chapter)
    long = [line for c in code_cells(chapter) for line in c.source.splitlines() if len(line) > 100]
    assert not long, f"{chapter.name}: {len(long)} code lines over 100 characters, e.g. {long[0]!r}"


def test_committed_outputs_are_one_complete_run(request, chapter):
    """The page shows the committed run: every code cell ran, in order, without an error."""
    known(request, "committed-run", chapter)
    cells = code_cells(chapter)
    counts = [c.execution_count for c in cells]
    assert None not in counts, f"{chapter.name}: code cells {[i for i, n in enumerate(counts) if n is None]} " \
                               "never ran: run `make outputs CHAPTER=...`"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{chapter.name}: out of order"
    errors = [o.ename for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{chapter.name}: error outputs {errors}"
    assert any(c.outputs for c in cells), f"{chapter.name}: no outputs at all"


def test_no_stderr_in_committed_outputs(request, chapter):
    """stderr is noise on a page; a cell may show one on purpose (mystnb output_stderr: show)."""
    known(request, "stderr", chapter)
    noise = [o.text[:120] for c in code_cells(chapter)
             if c.metadata.get("mystnb", {}).get("output_stderr") != "show"
             and "remove-stderr" not in c.metadata.get("tags", [])
             for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not noise, f"{chapter.name}: stderr output(s) {noise}"


def test_no_volatile_metadata(request, chapter):
    """Committed as `make outputs` writes them: no timestamps, every cell with an id."""
    known(request, "metadata", chapter)
    raw = json.loads(chapter.read_text())
    assert all("id" in c for c in raw["cells"]), f"{chapter.name}: cells without an id"
    nb = read(chapter)
    assert notebooks.clean(copy.deepcopy(nb)) == nb, f"{chapter.name}: volatile metadata"


def load_ci_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_html_check_finds_what_a_reader_would_see(tmp_path):
    """.ci/check_html.py on a two-page site: the good page passes every check, the bad page
    fails each one for the reason planted in it."""
    pytest.importorskip("playwright")
    check_html = load_ci_module("check_html")
    if not Path(check_html.CHROMIUM).exists():
        pytest.skip(f"no {check_html.CHROMIUM} (apt-get install chromium)")
    site = tmp_path / "site"
    site.mkdir()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure(figsize=(1, 1)).savefig(site / "figure.png")
    plt.close("all")
    (site / "good.html").write_text(
        '<html><body><h2 id="part">Part</h2><img src="figure.png"><a href="bad.html">next</a>'
        '<a href="#part">here</a><a href="https://elsewhere.invalid/">elsewhere</a></body></html>')
    (site / "bad.html").write_text(
        '<html><body><img src="missing.png"><a href="good.html#nowhere">x</a>'
        '<script src="https://lib.invalid/lib.js"></script><script>undefinedName()</script>'
        '<span class="math">\\(x^2\\)</span>'
        '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "1"}</script>'
        '</body></html>')
    report = check_html.check(site, tmp_path / "shots")
    good = {k: v for k, v in report["good"].items() if k != "_info"}
    bad = {k: v for k, v in report["bad"].items() if k != "_info"}
    assert good == {}
    assert set(bad) == {"links", "figures", "offline", "console", "math", "widgets"}
    assert any("missing.png" in p for p in bad["links"]) and any("#nowhere" in p for p in bad["links"])
    assert bad["offline"] == ["https://lib.invalid/lib.js"]
    assert any("undefinedName" in p for p in bad["console"])
    assert sorted(p.name for p in (tmp_path / "shots").glob("*.png")) == ["bad.png", "good.png"]


def test_execute_keeps_the_figures(tmp_path, monkeypatch):
    """`make outputs` under MPLBACKEND=Agg (as in CI) still commits inline figures."""
    pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = tmp_path / "figure.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.title('a line');")])
    nbformat.write(nb, path)
    notebooks.execute([path])
    outputs = read(path).cells[0].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
