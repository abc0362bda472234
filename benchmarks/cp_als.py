"""CP-ALS: lowrank.decompose.cp.cp_als against tensorly.decomposition.parafac, side by side.

Inputs: every 3×3 conv of the pretrained CIFAR-10 ResNet-56 (real weights, LOWRANK_DATA) and one
synthetic Gaussian 256×256×3×3 weight. Both solvers get the same float32 weight, rank, SVD
initialisation, tol and n_iter_max (TensorLy's stopping rule: |Δ relative error| < tol), one CPU
thread each. Errors are ‖W − Ŵ‖_F / ‖W‖_F in float64. "to TL error" is the time our solver needs
to first reach TensorLy's final error (rerun with n_iter_max = the first sweep that reaches it).

    python benchmarks/cp_als.py [--ranks 16,32] [--forms 4way] [--n-iter-max 200] [--quick]

Writes benchmarks/results/cp_als.md.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"                                   # before numpy / torch load BLAS

import argparse
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from lowrank.decompose.cp import conv_cp

torch.set_num_threads(1)


def relative_error(W64: np.ndarray, W_hat: np.ndarray) -> float:
    return float(np.linalg.norm(W64 - W_hat) / np.linalg.norm(W64))


def tensorly_run(W: torch.Tensor, rank: int, tol: float, n_iter_max: int):
    X = W.numpy()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # "n_eigenvecs larger than ..." when R > 3
        cp = parafac(X, rank, n_iter_max=n_iter_max, tol=tol, init="svd", random_state=0)
    seconds = time.perf_counter() - t
    return seconds, relative_error(X.astype(np.float64), tl.cp_to_tensor(cp).astype(np.float64))


def ours_run(W: torch.Tensor, rank: int, **kw):
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = conv_cp(W, rank, **kw)
    return time.perf_counter() - t, result, len(caught)


def compare(name, W, rank, form, tol, n_iter_max, real):
    X = W if form == "4way" else W.reshape(W.shape[0], W.shape[1], -1)
    t_tl, e_tl = tensorly_run(X, rank, tol, n_iter_max)
    t_ours, result, n_warn = ours_run(W, rank, form=form, tol=tol, n_iter_max=n_iter_max)
    reach = next((k + 1 for k, e in enumerate(result.history) if e <= e_tl), None)
    t_reach = None
    if reach is not None:                                   # deterministic: same sweeps, stopped early
        t_reach, early, _ = ours_run(W, rank, form=form, tol=tol, n_iter_max=reach)
        if early.relative_error > e_tl + 1e-9:
            t_reach = None
    return dict(name=name, shape="×".join(map(str, W.shape)), form=form, rank=rank, real=real,
                t_tl=t_tl, e_tl=e_tl, t_ours=t_ours, e_ours=result.relative_error,
                iters=result.n_iter, reach=reach, t_reach=t_reach, warned=n_warn)


def fmt_row(r):
    reach = "—" if r["t_reach"] is None else f"{r['t_reach']:.3f} s ({r['reach']} it)"
    ratio_reach = "—" if r["t_reach"] is None else f"{r['t_tl'] / r['t_reach']:.1f}×"
    return (f"| {r['name']} | {r['shape']} | {r['form']} | {r['rank']} | {r['t_tl']:.3f} | {r['e_tl']:.4f} | "
            f"{r['t_ours']:.3f} | {r['e_ours']:.4f} | {r['iters']} | {r['t_tl'] / r['t_ours']:.1f}× | "
            f"{reach} | {ratio_reach} |")


def summary(rows, label):
    t_tl = sum(r["t_tl"] for r in rows)
    t_ours = sum(r["t_ours"] for r in rows)
    # time to TensorLy's error; a run that never reaches it counts with its full time
    t_reach = sum(r["t_reach"] if r["t_reach"] is not None else r["t_ours"] for r in rows)
    not_reached = sum(r["t_reach"] is None for r in rows)
    better = sum(r["e_ours"] <= r["e_tl"] for r in rows)
    geo = math.exp(sum(math.log(r["t_tl"] / r["t_ours"]) for r in rows) / len(rows))
    return (f"| {label} | {len(rows)} | {t_tl:.2f} | {t_ours:.2f} | {t_tl / t_ours:.1f}× | {geo:.1f}× | "
            f"{t_reach:.2f} | {t_tl / t_reach:.1f}× | {better}/{len(rows)} | {not_reached} | "
            f"{sum(r['e_tl'] for r in rows) / len(rows):.4f} | {sum(r['e_ours'] for r in rows) / len(rows):.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="16,32")
    parser.add_argument("--forms", default="4way")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--n-iter-max", type=int, default=200)
    parser.add_argument("--synthetic-rank", type=int, default=64)
    parser.add_argument("--synthetic-n-iter-max", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="every 6th conv only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cp_als.md"))
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    forms = args.forms.split(",")

    root = os.environ.get("LOWRANK_DATA")
    if not root:
        raise SystemExit("set LOWRANK_DATA to the folder holding checkpoints/resnet56-4bfd9763.th")
    state = torch.load(f"{root}/checkpoints/resnet56-4bfd9763.th", map_location="cpu",
                       weights_only=True)["state_dict"]
    convs = [(k[len("module."):-len(".weight")], v) for k, v in state.items()
             if v.dim() == 4 and v.shape[-2:] == (3, 3)]
    if args.quick:
        convs = convs[::6]

    print(f"torch {torch.__version__}, tensorly {tl.__version__}, numpy {np.__version__}, one CPU thread")
    print(f"real: {len(convs)} pretrained ResNet-56 3×3 convs; synthetic: one Gaussian 256×256×3×3 weight")
    compare("warm-up", convs[1][1], 4, "4way", args.tol, 5, True)          # first-call costs

    header = ("| layer | shape | form | R | TensorLy s | TensorLy error | ours s | ours error | "
              "ours it | speed-up | ours to TL error | speed-up to TL error |")
    rows = []
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    for form in forms:
        for rank in ranks:
            for name, W in convs:
                if rank > math.prod(W.shape) // max(W.shape):
                    continue                                 # conv1 (3 input channels) caps the rank
                rows.append(compare(name, W, rank, form, args.tol, args.n_iter_max, True))
                print(fmt_row(rows[-1]), flush=True)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, 3, 3, generator=g) * math.sqrt(2 / (256 * 9))     # He-scaled, synthetic
    synthetic = [compare("synthetic Gaussian", W, args.synthetic_rank, "4way", args.tol,
                         args.synthetic_n_iter_max, False)]
    print(fmt_row(synthetic[0]), flush=True)
    elapsed = time.perf_counter() - start
    load = f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"

    totals_header = ("| inputs | runs | TensorLy s | ours s | speed-up (total) | speed-up (geo. mean) | "
                     "ours to TL error s | speed-up to TL error | ours error ≤ TL | never reached TL error | "
                     "mean TL error | mean ours error |")
    totals = [summary(rows, "ResNet-56 3×3 convs (real)")]
    for form in forms:
        for rank in ranks:
            sub = [r for r in rows if r["form"] == form and r["rank"] == rank]
            if sub:
                totals.append(summary(sub, f"  {form}, R = {rank}"))
    totals.append(summary(synthetic, "256×256×3×3 (synthetic)"))
    warned = sum(r["warned"] for r in rows + synthetic)

    print("\n" + totals_header)
    print("\n".join(totals))
    print(f"\n{warned} runs of ours warned of degeneracy; benchmark took {elapsed:.0f} s; load average {load}")

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") \
        else platform.processor()
    text = f"""# CP-ALS: `lowrank.decompose.cp.cp_als` vs TensorLy `parafac`

Generated by `python benchmarks/cp_als.py{' --quick' if args.quick else ''}` on {cpu}, one CPU thread for
both (torch {torch.__version__}, tensorly {tl.__version__} with its NumPy backend, numpy {np.__version__}).

- **Real inputs**: the {len(convs)} 3×3 convolutions of the pretrained CIFAR-10 ResNet-56
  (akamaster/pytorch_resnet_cifar10), as stored (float32), in the {', '.join(forms)} form;
  ranks {', '.join(map(str, ranks))} (conv1, 16×3×3×3, only where R ≤ 27).
- **Synthetic input**: one Gaussian 256×256×3×3 weight (He scaling, seed 0), rank
  {args.synthetic_rank}, n_iter_max {args.synthetic_n_iter_max}. Not a trained layer: it times large layers.
- Same settings for both: init "svd", tol {args.tol:g} on the change of relative error between sweeps
  (TensorLy's default rule), n_iter_max {args.n_iter_max} for the convs. Ours uses its defaults otherwise
  (ridge 1e-3 × relative error, line search on, float64 inside). TensorLy pads its SVD start with a
  uniform random part where R > I_n (`random_state=0`), ours with a seeded Gaussian part, so the
  two solvers follow different paths from the same family of starts.
- *speed-up* = TensorLy time / our time for the full runs. *ours to TL error*: the time our
  solver takes to first reach TensorLy's final error (our deterministic run stopped at that sweep);
  "—" if it never does (counted with its full time in the totals).
- Times are single measurements (1-minute load average {load}): on a busy machine
  individual rows are noisy, compare totals.

## Totals

{totals_header}
|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(totals) + f"""

{warned} of {len(rows) + 1} runs of ours emitted a `CPDegeneracyWarning`. Benchmark time: {elapsed:.0f} s.

## Every run

{header}
|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(fmt_row(r) for r in rows + synthetic) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
