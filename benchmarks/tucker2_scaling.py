"""Tucker-2 at ImageNet sizes: plain (HOSVD, HOOI, TensorLy) and data-informed (Σ-weighted ALS).

Side by side in one run, on 1 CPU thread, float64 (what `Tucker2Conv2d.from_dense` and the
Σ-weighted ALS compute in):

1. Plain Tucker-2 of torchvision resnet18's conv shapes (64×64×3×3 … 512×512×3×3, the 1×1
   downsample 128×64) and the 1×1 convs 192→32 (MobileNet-v2) and 1152→192 (EfficientNet-B0),
   at the ranks `lr.plan(model, "tucker2", 0.5 / 0.25)` gives: the previous default (HOSVD by
   SVDs of the unfoldings), the HOSVD from Gram eigenvectors, HOOI (the new default of
   `Tucker2Conv2d.from_dense`: at most 50 sweeps, tol 1e-8) and TensorLy's `partial_tucker`
   with its defaults. Error ‖W − Ŵ‖/‖W‖ and seconds.
2. Σ-weighted Tucker-2 (`weighted_tucker2`, as `lr.compress` calls it: Σ + 10⁻³·mean diag·I)
   on the same layers at n_iter=3 (the book's setting): seconds and peak memory (resident memory
   above the start, sampled every 5 ms, in a separate pass), against the previous implementation (commit 4a43b3c,
   loaded with `git show`: dense (S − rS)·rS normal equations) where its matrix fits in 256 MB.
   Σ from 256 ImageNet-sample images at 112 px through the same networks.
3. Real weights and data: ResNet-56 (pretrained on CIFAR-10) stage-3 convs, Σ from 256 CIFAR-10
   training images, previous vs new Σ-error at n_iter 3 and 20 (the default).

The weights of 1 and 2 are torchvision's random initialisation (seed 0): they serve for TIMING
ONLY (random kernels have flat spectra; their errors say nothing about trained networks).

Run: LOWRANK_DATA=/work/shared/data OMP_NUM_THREADS=1 python benchmarks/tucker2_scaling.py
(`--quick`: the layers with at most 128 input channels). Writes benchmarks/results/tucker2_scaling.md.
"""
import argparse
import os
import pathlib
import platform
import ctypes
import subprocess
import threading
import time
import types
import warnings

import tensorly as tl
import torch
import torchvision
from tensorly.decomposition import partial_tucker

import lowrank as lr
from lowrank.decompose.tucker import hooi, hosvd, mode_product, relative_error, tucker2_reconstruct, unfold
from lowrank.decompose.weighted import ridged, weighted_error, weighted_tucker2

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEFORE = "4a43b3c"                       # the last commit with the dense U_S solve and HOSVD default
DENSE_LIMIT = 2 ** 28                    # run the previous Σ-weighted ALS only if its H fits in 256 MB
RESNET18 = ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer2.1.conv1",
            "layer3.0.conv1", "layer3.1.conv1", "layer4.0.conv1", "layer4.1.conv1"]
ONE_BY_ONE = {"mobilenet_v2": "features.5.conv.2", "efficientnet_b0": "features.6.1.block.3.0"}


def previous_weighted():
    """`lowrank.decompose.weighted` as of commit BEFORE (its own imports resolved in today's package)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:lowrank/decompose/weighted.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("lowrank.decompose.previous_weighted")
    module.__package__ = "lowrank.decompose"
    exec(compile(source, f"{BEFORE}:lowrank/decompose/weighted.py", "exec"), module.__dict__)
    return module


def hosvd_by_svd(W, ranks):
    """The previous `Tucker2Conv2d.from_dense`: HOSVD by an SVD of each unfolding."""
    U_T = torch.linalg.svd(unfold(W, 0), full_matrices=False).U[:, :ranks[0]]
    U_S = torch.linalg.svd(unfold(W, 1), full_matrices=False).U[:, :ranks[1]]
    return mode_product(mode_product(W, U_T.T, 0), U_S.T, 1), U_T, U_S


def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(f):
    """(result, CPU seconds, wall seconds, peak resident memory above the start in MB)."""
    start, peak, done = resident(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done.set()
    watcher.join()
    return out, cpu, wall, max(peak[0] - start, 0) / 2 ** 20


def layers_and_statistics(quick):
    """[(label, W float64, ranks at 50 %, ranks at 25 %, Σ)] for the random-init torchvision models."""
    images = lr.data.imagenet_sample(112)
    out = []
    for arch, names in [("resnet18", RESNET18), *((a, [n]) for a, n in ONE_BY_ONE.items())]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)()
        if quick:
            names = [n for n in names if model.get_submodule(n).in_channels <= 128]
            if not names:
                continue
        plans = [lr.plan(model, "tucker2", f, input_size=(3, 112, 112)) for f in (0.5, 0.25)]
        stats = lr.calibrate(model, images, layers=names, limit=256, batch_size=64, progress=False)
        for n in names:
            W = model.get_submodule(n).weight.detach().double()
            out.append((f"{arch} {n}", W, *(tuple(p[n]["rank"]) for p in plans), stats[n].sigma))
    return out


def plain_rows(layers):
    rows = []
    for label, W, *ranks_by_share, _ in layers:
        for share, ranks in zip(("50 %", "25 %"), ranks_by_share):
            row = dict(layer=label, shape="×".join(map(str, W.shape)), share=share, ranks=ranks)
            for key, f in [("svd", lambda: hosvd_by_svd(W, ranks)), ("hosvd", lambda: hosvd(W, ranks)),
                           ("hooi", lambda: hooi(W, ranks)),
                           ("tl", lambda: partial_tucker(W, rank=list(ranks), modes=[0, 1])[0])]:
                out, cpu, _, _ = measure(f)
                core, factors = (out[0], out[1]) if key == "tl" else (out[0], out[1:])
                row[key] = (relative_error(W, tucker2_reconstruct(core, *factors)), cpu)
            rows.append(row)
            print(f"plain {label:32s} {row['shape']:>11s} {share} {ranks}: " + " | ".join(
                f"{k} {e:.5f} {t:.2f}s" for k, (e, t) in ((k, row[k]) for k in ("svd", "hosvd", "hooi", "tl"))),
                flush=True)
    return rows


def informed_rows(layers, previous):
    rows = []
    for label, W, *ranks_by_share, Sigma in layers:
        Sigma = ridged(Sigma)
        for share, ranks in zip(("50 %", "25 %"), ranks_by_share):
            S, rS = W.shape[1], ranks[1]
            dense_bytes = ((S - rS) * rS) ** 2 * 8
            row = dict(layer=label, shape="×".join(map(str, W.shape)), share=share, ranks=ranks,
                       sigma_mb=Sigma.numel() * 8 / 2 ** 20, dense_gb=dense_bytes / 1e9)
            (core, U_T, U_S, history), *row["new"] = measure(lambda: weighted_tucker2(W, Sigma, ranks, n_iter=3))
            row["new_error"] = min(history)
            row["Sigma"], row["W"] = Sigma, W                  # for memory_pass, then dropped
            if dense_bytes <= DENSE_LIMIT:
                out, *row["old"] = measure(lambda: previous.weighted_tucker2(W, Sigma, ranks, n_iter=3))
                row["old_error"] = min(out[3])
                if W.shape[2] == W.shape[3] == 1:     # 1×1 convs also at the default n_iter=20
                    row["old20"] = measure(lambda: previous.weighted_tucker2(W, Sigma, ranks))[1]
                    row["new20"] = measure(lambda: weighted_tucker2(W, Sigma, ranks))[1]
            rows.append(row)
            old = (f"previous {row['old_error']:.5f} {row['old'][0]:.1f}s" if "old" in row
                   else f"previous not run (H: {row['dense_gb']:.2f} GB)")
            print(f"Σ {label:32s} {row['shape']:>11s} {share} {ranks}: new {row['new_error']:.5f} "
                  f"{row['new'][0]:.1f}s | {old}", flush=True)
    return rows


def memory_pass(rows, previous):
    """Peak memory of the Σ-weighted rows, measured again at n_iter=2 (one U_S step: the same
    arrays as any later iteration) with every block of 64 kB or more from mmap, so that freed
    memory leaves the resident set at once, and the heap trimmed before each call (glibc mallopt
    M_MMAP_THRESHOLD, malloc_trim; slower, hence a separate pass after all timings)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)                                  # M_MMAP_THRESHOLD

    def peak(f):
        libc.malloc_trim(0)                                  # free heap pages leave the resident set
        return measure(f)[3]

    for row in rows:
        W, Sigma, ranks = row.pop("W"), row.pop("Sigma"), row["ranks"]
        row["new_mb"] = peak(lambda: weighted_tucker2(W, Sigma, ranks, n_iter=2))
        if "old" in row:
            row["old_mb"] = peak(lambda: previous.weighted_tucker2(W, Sigma, ranks, n_iter=2))
        print(f"memory {row['layer']} {row['share']}: new {row['new_mb']:.0f} MB, previous "
              f"{row.get('old_mb', float('nan')):.0f} MB (Σ {row['sigma_mb']:.0f} MB)", flush=True)


def real_rows(previous):
    model = lr.models.resnet56()
    names = ["layer3.0.conv2", "layer3.4.conv1", "layer3.8.conv2"]
    stats = lr.calibrate(model, lr.data.cifar10("train"), layers=names, limit=256, progress=False)
    rows = []
    for name in names:
        W, Sigma = model.get_submodule(name).weight.detach().double(), ridged(stats[name].sigma)
        T, S = W.shape[:2]
        for ranks in [(T // 2, S // 2), (T // 4, S // 4)]:
            for n_iter in (3, 20):
                new, cpu_new, *_ = measure(lambda: weighted_tucker2(W, Sigma, ranks, n_iter=n_iter))
                old, cpu_old, *_ = measure(lambda: previous.weighted_tucker2(W, Sigma, ranks, n_iter=n_iter))
                errors = [weighted_error(W, tucker2_reconstruct(*out[:3]), Sigma) for out in (new, old)]
                rows.append(dict(layer=name, ranks=ranks, n_iter=n_iter, new=errors[0], old=errors[1],
                                 start=new[3][0], t_new=cpu_new, t_old=cpu_old))
                print(f"real {name} {ranks} n_iter {n_iter}: new {errors[0]:.5f} {cpu_new:.2f}s | previous "
                      f"{errors[1]:.5f} {cpu_old:.2f}s | HOSVD start {new[3][0]:.5f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shapes up to 128 input channels only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tl.set_backend("pytorch")
    warnings.simplefilter("ignore", UserWarning)       # torchvision / TensorLy chatter
    load_start, started = os.getloadavg()[0], time.perf_counter()
    previous = previous_weighted()
    layers = layers_and_statistics(args.quick)
    plain = plain_rows(layers)
    informed = informed_rows(layers, previous)
    real = real_rows(previous)
    memory_pass(informed, previous)
    elapsed, load_end = time.perf_counter() - started, os.getloadavg()[0]

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    big = [r for r in plain if r["shape"].startswith("512×512")]
    lines = [
        "# Tucker-2 at ImageNet sizes: plain and data-informed",
        "",
        f"Generated by `OMP_NUM_THREADS=1 python benchmarks/tucker2_scaling.py{' --quick' if args.quick else ''}` "
        f"in {elapsed / 60:.1f} min on {cpu} ({os.cpu_count()} cores, shared: load average {load_start:.1f} at "
        f"the start, {load_end:.1f} at the end), 1 thread, float64, torch {torch.__version__}, TensorLy "
        f"{tl.__version__}. Seconds are CPU seconds of the process measured side by side in this one run "
        "(wall clock on the shared machine was longer); memory is the peak resident memory above the "
        "start of each call, measured in a separate pass at n_iter=2 with glibc's mmap threshold at 64 kB "
        "(freed blocks leave the resident set at once).",
        "",
        "**The weights of the first two tables are torchvision's random initialisation (seed 0) and their Σ "
        "come from 256 ImageNet-sample images at 112 px passed through those random networks: these "
        "tables are for TIMING and MEMORY only.** The last table has real weights and real data.",
        "",
        "## Plain Tucker-2 (`Tucker2Conv2d.from_dense`)",
        "",
        "Previous default: HOSVD by SVDs of the unfoldings. New default: HOOI started from the HOSVD "
        "(Gram eigenvectors), at most 50 sweeps, tol 1e-8, best iterate kept. TensorLy: "
        "`partial_tucker(W, rank, modes=[0, 1])` with its defaults.",
        "",
    ]
    if big:
        r = big[0]
        lines += [f"- 512×512×3×3 at 50 % ranks {r['ranks']}: previous {r['svd'][1]:.2f} s, HOSVD by Gram "
                  f"eigenvectors {r['hosvd'][1]:.2f} s, HOOI {r['hooi'][1]:.2f} s (error {r['hooi'][0]:.4f} vs "
                  f"{r['svd'][0]:.4f}), TensorLy {r['tl'][1]:.2f} s (error {r['tl'][0]:.4f}).", ""]
    worst = max(r["hooi"][0] - r["tl"][0] for r in plain)
    lines += [f"- HOOI − TensorLy error over all {len(plain)} rows: at most {worst:+.1e} (negative: HOOI lower).",
              f"- HOOI − previous HOSVD error: from {min(r['hooi'][0] - r['svd'][0] for r in plain):+.4f} to "
              f"{max(r['hooi'][0] - r['svd'][0] for r in plain):+.4f}.", "",
              "| layer | shape | kept | ranks | HOSVD (SVD) err | s | HOSVD (eigh) s | HOOI err | s | "
              "TensorLy err | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plain:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['share']} | {r['ranks'][0]}, {r['ranks'][1]} | "
                     f"{r['svd'][0]:.4f} | {r['svd'][1]:.2f} | {r['hosvd'][1]:.2f} | {r['hooi'][0]:.4f} | "
                     f"{r['hooi'][1]:.2f} | {r['tl'][0]:.4f} | {r['tl'][1]:.2f} |")
    lines += ["", "## Data-informed Tucker-2 (`weighted_tucker2`, n_iter=3)", "",
              "New: closed-form (U_T, G) step, U_S by 8 steps of preconditioned conjugate gradients on "
              "matrix-free products with Σ; 1×1 kernels in closed form (weighted SVD). Previous: the same "
              "(U_T, G) step, U_S by a dense solve of (S − rS)·rS normal equations (its matrix H alone: "
              "column `H`), run where H ≤ 256 MB. Σ-errors of random-init layers are for the record only.", "",
              *[f"- {r['layer']} ({r['shape']}, {r['share']}) at the default n_iter=20: previous {r['old20']:.1f} s, "
                f"new {r['new20']:.2f} s." for r in informed if "old20" in r], "",
              "| layer | shape | kept | ranks | Σ MB | new s | new peak MB | new Σ-err | previous s | "
              "previous peak MB | previous Σ-err | H (previous) GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in informed:
        old = (f"{r['old'][0]:.1f} | {r['old_mb']:.0f} | {r['old_error']:.4f}" if "old" in r else "not run | | ")
        lines.append(f"| {r['layer']} | {r['shape']} | {r['share']} | {r['ranks'][0]}, {r['ranks'][1]} | "
                     f"{r['sigma_mb']:.0f} | {r['new'][0]:.1f} | {r['new_mb']:.0f} | {r['new_error']:.4f} | {old} | "
                     f"{r['dense_gb']:.2f} |")
    lines += ["", "## Real weights and data: ResNet-56 stage 3, Σ from 256 CIFAR-10 training images", "",
              f"- New − previous Σ-error over {len(real)} runs: from {min(r['new'] - r['old'] for r in real):+.1e} "
              f"to {max(r['new'] - r['old'] for r in real):+.1e} (negative: new lower); CPU time new "
              f"{sum(r['t_new'] for r in real):.1f} s, previous {sum(r['t_old'] for r in real):.1f} s.", "",
              "| layer | ranks | n_iter | HOSVD start | previous Σ-err | s | new Σ-err | s |", "|---|---|---|---|---|---|---|---|"]
    for r in real:
        lines.append(f"| {r['layer']} | {r['ranks'][0]}, {r['ranks'][1]} | {r['n_iter']} | {r['start']:.5f} | "
                     f"{r['old']:.5f} | {r['t_old']:.2f} | {r['new']:.5f} | {r['t_new']:.2f} |")
    out = ROOT / "benchmarks" / "results" / "tucker2_scaling.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
