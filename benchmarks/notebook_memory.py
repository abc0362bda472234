"""Peak memory and wall time of each chapter run as CI runs it (nbval, one thread).

For each chapter, runs `pytest --nbval-lax` and samples every 0.2 s the resident memory of each
process under it (the Jupyter kernel is the one that counts: it is what a reader's Binder or Colab
session holds). Writes benchmarks/results/notebook_memory.md. The chapters' authors state the
peak on a chapter's page where it exceeds 2 GB (Binder's guaranteed memory).

    LOWRANK_DATA=<data root> OMP_NUM_THREADS=1 python benchmarks/notebook_memory.py [book/02_svd.ipynb ...]
"""
import os
import pathlib
import platform
import subprocess
import sys
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent


def peak(command):
    """(largest RSS of one process, largest RSS summed over the tree, seconds, exit code)."""
    start = time.perf_counter()
    process = psutil.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    one = tree = 0
    while process.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [process] + process.children(recursive=True)]
        except psutil.Error:
            continue
        one, tree = max(one, max(rss)), max(tree, sum(rss))
        time.sleep(0.2)
    return one, tree, time.perf_counter() - start, process.returncode


def main():
    chapters = sys.argv[1:] or sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("book/[0-9]*.ipynb"))
    rows = []
    for chapter in chapters:
        one, tree, seconds, code = peak([sys.executable, "-m", "pytest", "-q", "--nbval-lax",
                                         "--nbval-cell-timeout=900", "-p", "no:cacheprovider",
                                         chapter])
        rows.append(f"| {chapter} | {one / 2**30:.2f} | {tree / 2**30:.2f} | {seconds / 60:.1f} | "
                    f"{'passed' if code == 0 else f'exit {code}'} |")
        print(rows[-1], flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    text = "\n".join([
        "# Peak memory of each chapter (nbval run)", "",
        f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; OMP_NUM_THREADS={threads}; "
        "sampled every 0.2 s (a shorter peak can be missed). Wall times depend on the machine's load.",
        "", "| chapter | largest process (GiB) | all processes (GiB) | minutes | result |",
        "|---|---|---|---|---|", *rows, ""])
    out = ROOT / "benchmarks" / "results" / "notebook_memory.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
