"""Σ-weighted Tucker-2 and CP (`lowrank.decompose.weighted`) on every 3×3 conv of ResNet-56.

Inputs: real pretrained weights (Idelbayev's CIFAR-10 ResNet-56) and, per layer, the real Σ
(second moment of its input patches) from `lowrank.stats.calibrate` over the first 256 images
of the offline CIFAR-10 training subset.

Side by side in one run, for the 54 3×3 convs of the residual blocks at ranks (T//2, S//2),
all errors relative Σ-errors ‖(W − Ŵ) Σ^{1/2}‖ / ‖W Σ^{1/2}‖:
- HOSVD and HOOI (`tucker.hooi`, the Frobenius-optimal Tucker-2): what plain methods give;
- `weighted_tucker2` with its defaults: after its first closed-form step, and at the end;
- wall time of `whitening` + `weighted_tucker2` summed over the 54 layers, on 1 and on 2 threads.
Then CP (4-way) at rank R = T on one conv per stage: `conv_cp` (Frobenius CP-ALS, also the start)
against `weighted_cp` with its defaults.
OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE, unless set):
on a shared machine spinning threads make 2-thread linear algebra many times slower than 1 thread.
Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/weighted.py
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime starts

import pathlib  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from lowrank import data, models  # noqa: E402
from lowrank.decompose.cp import CPDegeneracyWarning, conv_cp  # noqa: E402
from lowrank.decompose.tucker import hooi, hosvd, tucker2_reconstruct  # noqa: E402
from lowrank.decompose.weighted import weighted_cp, weighted_error, weighted_tucker2, whitening  # noqa: E402
from lowrank.stats import calibrate  # noqa: E402

IMAGES = 256

model = models.resnet56(pretrained=True)
convs = {name: m.weight.detach() for name, m in model.named_modules()
         if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and name != "conv1"}
torch.set_num_threads(2)
start = time.perf_counter()
stats = calibrate(model, data.cifar10("train", limit=IMAGES), layers=list(convs), progress=False)
calibration_s = time.perf_counter() - start
sigmas = {name: s.sigma for name, s in stats.items()}

rows, seconds, cpu_seconds = {}, {}, {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    seconds[threads] = cpu_seconds[threads] = 0.0
    for name, W in convs.items():
        T, S = W.shape[:2]
        start, cpu_start = time.perf_counter(), time.process_time()
        core, U_T, U_S, history = weighted_tucker2(W, whitening(sigmas[name]), (T // 2, S // 2))
        seconds[threads] += time.perf_counter() - start
        cpu_seconds[threads] += time.process_time() - cpu_start
        if threads == 1:
            Sigma = sigmas[name]
            rows[name] = dict(
                hosvd=weighted_error(W, tucker2_reconstruct(*hosvd(W, (T // 2, S // 2))), Sigma),
                hooi=weighted_error(W, tucker2_reconstruct(*hooi(W, (T // 2, S // 2))), Sigma),
                step1=history[1],
                final=weighted_error(W, tucker2_reconstruct(core, U_T, U_S), Sigma),
                iterations=len(history) - 1)

lines = ["# Σ-weighted Tucker-2 and CP on ResNet-56",
         "",
         f"Real pretrained ResNet-56 weights; Σ per layer from {IMAGES} real CIFAR-10 training images "
         f"(`calibrate`, {calibration_s:.1f} s on 2 threads). Relative Σ-errors "
         "‖(W − Ŵ) Σ^{1/2}‖ / ‖W Σ^{1/2}‖, mean over the layers of each stage; ranks (T/2, S/2).",
         "",
         "| stage | layers | T×S | HOSVD | HOOI | Σ-Tucker, 1st step | Σ-Tucker, final | mean iterations |",
         "|---|---|---|---|---|---|---|---|"]
for stage in ("layer1", "layer2", "layer3"):
    names = [n for n in rows if n.startswith(stage)]
    mean = {k: sum(rows[n][k] for n in names) / len(names) for k in rows[names[0]]}
    sizes = sorted({f"{convs[n].shape[0]}×{convs[n].shape[1]}" for n in names})
    lines.append(f"| {stage} | {len(names)} | {', '.join(sizes)} | {mean['hosvd']:.4f} | {mean['hooi']:.4f} | "
                 f"{mean['step1']:.4f} | {mean['final']:.4f} | {mean['iterations']:.1f} |")
lines += ["",
          f"Time for `whitening` + `weighted_tucker2` (defaults: n_iter=20, tol=1e-6) over all "
          f"{len(convs)} layers: **{seconds[1]:.1f} s on 1 thread, {seconds[2]:.1f} s on 2 threads** "
          f"wall clock; CPU time {cpu_seconds[1]:.1f} s and {cpu_seconds[2]:.1f} s "
          f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; a shared machine, load average "
          f"{os.getloadavg()[0]:.1f} at the end).",
          "",
          "| layer | T×S | CP rank | conv_cp Σ-error | weighted_cp Σ-error | sweeps | weighted_cp time (s, 1 thread) |",
          "|---|---|---|---|---|---|---|"]
torch.set_num_threads(1)
for name in ("layer1.4.conv2", "layer2.4.conv2", "layer3.4.conv2"):
    W, Sigma = convs[name], sigmas[name]
    T, S = W.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        init = conv_cp(W, T)
        start = time.perf_counter()
        result = weighted_cp(W, Sigma, T, init=init)
        elapsed = time.perf_counter() - start
    plain = weighted_error(W, init.reconstruct(), Sigma)
    lines.append(f"| {name} | {T}×{S} | {T} | {plain:.4f} | {result.relative_error:.4f} | "
                 f"{result.n_iter} | {elapsed:.2f} |")

text = "\n".join(lines) + "\n"
print(text)
out = pathlib.Path(__file__).parent / "results" / "weighted.md"
out.write_text(text)
print(f"written to {out}")
