"""Generate the student and autograder versions of the assignments with Otter Assign.

    python assignments/build.py                 # every master notebook assignments/NN_*.ipynb
    python assignments/build.py 03_tucker       # one of them

For each master ``NN_name.ipynb`` this writes

    assignments/dist/student/NN_name/      NN_name.ipynb (no solutions) and tests/ (public tests)
    assignments/dist/autograder/NN_name/   NN_name.ipynb (with solutions), tests/ (public and
                                           hidden tests) and NN_name-autograder.zip for
                                           ``otter run`` / ``otter grade`` / Gradescope
"""
import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
DIST = HERE / "dist"


def masters() -> list[pathlib.Path]:
    """The master notebooks, in chapter order."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def build(master: pathlib.Path, dist: pathlib.Path = DIST) -> dict:
    """Run Otter Assign on ``master``; return the paths of the two versions and the zip."""
    from otter.assign import main as otter_assign

    name = master.stem
    with tempfile.TemporaryDirectory() as tmp:
        otter_assign(str(master), tmp, no_run_tests=True, no_pdfs=True)
        out = {}
        for side in ("student", "autograder"):
            out[side] = dist / side / name
            shutil.rmtree(out[side], ignore_errors=True)
            shutil.copytree(pathlib.Path(tmp) / side, out[side])
    (zipfile,) = out["autograder"].glob(f"{name}-autograder_*.zip")  # Otter stamps it with the time
    out["zip"] = zipfile.rename(out["autograder"] / f"{name}-autograder.zip")
    return out


if __name__ == "__main__":
    chosen = [HERE / f"{n.removesuffix('.ipynb')}.ipynb" for n in sys.argv[1:]] or masters()
    for master in chosen:
        paths = build(master)
        print(f"{master.name}: {paths['student'].relative_to(HERE.parent)}, "
              f"{paths['zip'].relative_to(HERE.parent)}")
