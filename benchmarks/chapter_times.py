"""How long the book's chapters take to execute, at two revisions side by side.

Each chapter is executed (nbclient, a copy; the committed notebook is not touched) at revision A
(a `git worktree` of it) and at the working tree, alternately A, this, A, this ..., each in a
fresh kernel with an empty user cache (as on a fresh CI machine) and the same environment.
Wall and CPU seconds of the kernel per chapter and in total, and the ratio this / A.

Run (one core, one thread: `taskset -c 0` keeps the two from sharing the machine differently):
  LOWRANK_DATA=/work/shared/data OMP_NUM_THREADS=1 taskset -c 0 \
      .venv/bin/python benchmarks/chapter_times.py 4b0473d book/0[1-6]*.ipynb
Writes benchmarks/results/chapter_times.md.
"""
import argparse
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE = """
import sys, time, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=None, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[1].rsplit("/", 1)[0]}}).execute()
"""


def execute(root: pathlib.Path, chapter: str, cache: pathlib.Path) -> tuple:
    """(wall, CPU) seconds to execute ``root/chapter`` with ``root``'s package, empty cache."""
    env = {**os.environ, "PYTHONPATH": str(root), "LOWRANK_CACHE": str(cache), "MPLBACKEND": "Agg"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CODE, str(root / chapter)], env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the revision to compare with (A)")
    parser.add_argument("chapters", nargs="+", help="notebooks, relative to the repository root")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "a"), args.revision],
                       check=True, capture_output=True)
        try:
            for chapter in args.chapters:
                times = {}
                for label, root in (("A", tmp / "a"), ("this", ROOT)):
                    times[label] = execute(root, chapter, tmp / f"cache-{label}-{len(rows)}")
                    print(f"{chapter} {label}: wall {times[label][0]:.1f} s, CPU {times[label][1]:.1f} s", flush=True)
                rows.append((chapter, times))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "a")], check=False)
    total = {k: sum(t[k][0] for _, t in rows) for k in ("A", "this")}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    lines = ["# Chapter execution times", "",
             f"A = {args.revision}, this = {head} (working tree); {os.environ.get('OMP_NUM_THREADS', 'all')} "
             f"thread(s), CPUs {sorted(os.sched_getaffinity(0))}, load average at the end "
             f"{os.getloadavg()[0]:.1f}. Seconds of wall time (CPU time in brackets).", "",
             "| chapter | A (s) | this (s) | this / A |", "|---|---|---|---|"]
    for chapter, t in rows:
        lines.append(f"| {chapter} | {t['A'][0]:.0f} ({t['A'][1]:.0f}) | {t['this'][0]:.0f} ({t['this'][1]:.0f}) | "
                     f"{t['this'][0] / t['A'][0]:.2f} |")
    lines.append(f"| total | {total['A']:.0f} | {total['this']:.0f} | {total['this'] / total['A']:.2f} |")
    out = ROOT / "benchmarks" / "results" / "chapter_times.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
