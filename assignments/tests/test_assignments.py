"""Every assignment end to end, through Otter-Grader itself: Otter Assign generates the student and
autograder versions, the solution gets full marks, a deliberately wrong submission
(``<name>_wrong.ipynb`` here) gets exactly the score it should, question by question, and no
solution or hidden test reaches the student version. Run by ``make assignments-test``.
"""
import importlib.util
import json
import os
import pathlib
import re

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_spec = importlib.util.spec_from_file_location("assignments_build", HERE.parent / "build.py")
build = importlib.util.module_from_spec(_spec)   # assignments/build.py, whatever else is "build"
_spec.loader.exec_module(build)

#: autograded points per question of each wrong submission (the note at its top says why)
WRONG_SCORES = {
    "01_measuring": {"q1": 0, "q2": 3, "q3": 2},
    "02_svd": {"q1": 2, "q2": 1, "q3": 2},
    "03_tucker": {"q1": 1, "q2": 1, "q3": 2},
    "04_cp": {"q1": 2, "q2": 1, "q3": 1},
    "05_energy_ranks": {"q1": 0, "q2": 2, "q3": 2},
    "06_data_informed": {"q1": 0, "q2": 1, "q3": 2},
    "07_rank_search": {"q1": 0, "q2": 1, "q3": 2},
    "08_deploy": {"q1": 1, "q2": 2, "q3": 2},
    "09_beyond_cifar": {"q1": 1, "q2": 1, "q3": 2},
}
NAMES = [m.stem for m in build.masters()]


@pytest.fixture(scope="module", autouse=True)
def absolute_data_root():
    """Grading runs in a temporary folder: a relative LOWRANK_DATA must not change meaning."""
    old = os.environ.get("LOWRANK_DATA")
    if old:
        os.environ["LOWRANK_DATA"] = str(pathlib.Path(old).expanduser().resolve())
    yield
    if old:
        os.environ["LOWRANK_DATA"] = old


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def generated(name, dist):
    paths = {side: dist / side / name for side in ("student", "autograder")}
    if not paths["student"].is_dir():
        return build.build(build.HERE / f"{name}.ipynb", dist)
    return {**paths, "zip": paths["autograder"] / f"{name}-autograder.zip"}


def cells(path):
    return json.loads(pathlib.Path(path).read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def grade(submission, zipfile):
    from otter.api import grade_submission

    return grade_submission(str(submission), str(zipfile), quiet=True)


def solution_lines(master):
    """The lines only a solution holds (code between the markers or after ``= ... # SOLUTION``,
    and the Markdown of solution blocks), without those that appear elsewhere in the master."""
    secret, other, in_block = set(), set(), False
    for cell in cells(master):
        text = source(cell)
        if cell["cell_type"] == "raw":
            in_block = {"# BEGIN SOLUTION": True, "# END SOLUTION": False}.get(text.strip(), in_block)
            continue
        marked = False
        for line in map(str.strip, text.splitlines()):
            if line in ("# BEGIN SOLUTION", "# END SOLUTION"):
                marked = line == "# BEGIN SOLUTION"
            elif marked or (in_block and cell["cell_type"] == "markdown"):
                secret.add(line)
            elif line.endswith("# SOLUTION"):
                secret.add(line.split("=", 1)[-1].removesuffix("# SOLUTION").strip())
            else:
                other.add(line)
    return {line for line in secret - other if len(line) >= 12}


def test_one_master_per_chapter():
    chapters = {p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb")}
    assert set(NAMES) <= chapters, f"masters without a chapter: {set(NAMES) - chapters}"
    assert {"01_measuring", "02_svd", "03_tucker", "04_cp", "05_energy_ranks",
            "06_data_informed", "07_rank_search"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_is_the_chapters_setup_cell(name):
    first = lambda path: next(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert first(build.HERE / f"{name}.ipynb") == first(ROOT / "book" / f"{name}.ipynb")


@pytest.mark.parametrize("name", NAMES)
def test_student_version_holds_no_solution_and_no_hidden_test(name, dist):
    paths = generated(name, dist)
    student = paths["student"] / f"{name}.ipynb"
    text = "\n".join(source(c) for c in cells(student))
    assert not re.search(r"(BEGIN|END) (SOLUTION|TESTS)|# SOLUTION", text)
    secrets = solution_lines(build.HERE / f"{name}.ipynb")
    assert secrets, "the master has no solution to hide"
    leaked = sorted(secrets & {line.strip() for line in text.splitlines()})
    assert not leaked, f"solution lines in the student notebook: {leaked[:5]}"
    public, everything = {}, {}
    for side, found in (("student", public), ("autograder", everything)):
        for test in sorted((paths[side] / "tests").glob("q*.py")):
            found[test.stem] = test.read_text()
    assert set(public) <= set(everything) and public, "no public tests"
    for q, code in public.items():
        assert "hidden=True" not in code, f"{q}: a hidden test in the student version"
        assert code.count("@test_case") == everything[q].count("hidden=False"), q
    assert any("hidden=True" in code for code in everything.values()), "no hidden test at all"


@pytest.mark.parametrize("name", NAMES)
def test_solution_gets_full_marks(name, dist):
    paths = generated(name, dist)
    results = grade(paths["autograder"] / f"{name}.ipynb", paths["zip"])
    assert results.possible > 0
    assert results.total == results.possible, results.to_report_str()


@pytest.mark.parametrize("name", NAMES)
def test_wrong_submission_gets_its_partial_score(name, dist):
    paths = generated(name, dist)
    results = grade(HERE / f"{name}_wrong.ipynb", paths["zip"])
    scores = {q: results.get_score(q) for q in results.results}
    assert scores == WRONG_SCORES[name], results.to_report_str()
    assert 0 < results.total == sum(WRONG_SCORES[name].values()) < results.possible
