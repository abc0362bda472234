"""Time `lowrank.calibrate` on the pretrained ResNet-56 with 1,000 real CIFAR-10 test images.

Side by side in one run, on 2 CPU threads:
- a plain forward pass over the same images (what any calibration must pay at least);
- `calibrate`: for the stride-1 convs the patch Gram from one conv weight gradient and a few
  border strips (`lowrank.stats.patch_gram`, no patch matrix), float32 per batch, float64 totals;
- the direct way it replaces: the im2col patch matrix X (`F.unfold`) and X.T @ X in float32;
- the same in float64, on the first 128 images: the exact reference, to measure how far the
  float32 batch Grams move Σ.

Inputs: real pretrained weights (Idelbayev's ResNet-56) and real CIFAR-10 test images.
Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/calibrate.py
"""
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.stats import calibrate, conv_padding

torch.set_num_threads(2)
IMAGES, REFERENCE_IMAGES, BATCH = 1000, 128, 128


def direct_calibrate(model, x, dtype):
    """The direct way: F.unfold patches X and X.T @ X per batch in ``dtype``, summed in float64.
    Returns {name: Σ [d, d]}."""
    grams, counts, handles = {}, {}, []

    def hook(name):
        def accumulate(layer, inputs, output):
            z = inputs[0]
            if isinstance(layer, nn.Conv2d):
                z = F.unfold(F.pad(z, conv_padding(layer)), layer.kernel_size,
                             dilation=layer.dilation, stride=layer.stride)
                z = z.transpose(1, 2).reshape(-1, z.shape[1])
            X = z.to(dtype)
            grams[name] = grams.get(name, 0) + (X.T @ X).double()
            counts[name] = counts.get(name, 0) + X.shape[0]
        return accumulate

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for i in range(0, len(x), BATCH):
                model(x[i:i + BATCH])
    finally:
        for h in handles:
            h.remove()
    return {name: g / counts[name] for name, g in grams.items()}


def seconds(f):
    """``((wall seconds, CPU seconds of this process), f())``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def main():
    model = lowrank.models.resnet56(pretrained=True)
    t_load, x = seconds(lambda: torch.stack(
        [img for img, _ in lowrank.data.cifar10("test", limit=IMAGES)]))
    n = len(x)

    def forward(images):
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                model(images[i:i + BATCH])

    forward(x[:BATCH])  # warm-up
    t_forward, _ = seconds(lambda: forward(x))
    t_calibrate, stats = seconds(lambda: calibrate(model, x, batch_size=BATCH, progress=False))
    t_direct, direct = seconds(lambda: direct_calibrate(model, x, torch.float32))
    small = x[:REFERENCE_IMAGES]
    t_small, stats_small = seconds(lambda: calibrate(model, small, batch_size=BATCH, progress=False))
    t_reference, reference = seconds(lambda: direct_calibrate(model, small, torch.float64))

    def largest_change(a, b):   # max over layers of ‖Σ_a − Σ_b‖_F / ‖Σ_b‖_F
        return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)

    deviation = largest_change({k: s.second_moment for k, s in stats_small.items()}, reference)
    direct_deviation = largest_change(direct, {k: s.second_moment for k, s in stats.items()})
    convergence = largest_change({k: s.second_moment for k, s in stats_small.items()},
                                 {k: s.second_moment for k, s in stats.items()})
    floats = sum(s.second_moment.numel() + s.mean.numel() for s in stats.values())

    rows = [
        ("load + decode images", n, t_load, None),
        ("forward pass only", n, t_forward, t_forward),
        ("`calibrate` (shift-structured Grams, float32 per batch)", n, t_calibrate, t_forward),
        ("direct: `F.unfold` patches, X.T @ X in float32", n, t_direct, t_forward),
        ("`calibrate`", REFERENCE_IMAGES, t_small, None),
        ("reference: `F.unfold` patches, X.T @ X in float64", REFERENCE_IMAGES, t_reference, t_small),
    ]
    lines = [
        "# Calibration of ResNet-56 (layer input statistics)",
        "",
        f"Real pretrained ResNet-56 (Idelbayev), real CIFAR-10 test images, batch {BATCH}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        f"{len(stats)} layers (55 convs + the linear); statistics held: {floats / 1e6:.2f} M float64 "
        f"({floats * 8 / 2**20:.1f} MiB), whatever the number of images.",
        "",
        "| step | images | wall s | CPU s | ratio (wall) | ratio (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for what, count, (wall, cpu), base in rows:
        ratios = "| | |" if base is None else f"| {wall / base[0]:.2f}× | {cpu / base[1]:.2f}× |"
        lines.append(f"| {what} | {count} | {wall:.2f} | {cpu:.2f} {ratios}")
    lines += [
        "",
        "Ratios: against the forward pass for the 1,000-image run; against `calibrate` on the same "
        f"{REFERENCE_IMAGES} images for the reference.",
        f"Largest relative difference ‖Σ − Σ_ref‖_F / ‖Σ_ref‖_F over all layers "
        f"(`calibrate` vs the float64 reference, {REFERENCE_IMAGES} images): {deviation:.1e}.",
        f"Largest relative difference between `calibrate` and the direct float32 way ({n} images): "
        f"{direct_deviation:.1e}.",
        f"`calibrate` of {n} images in {t_calibrate[0]:.1f} s wall: "
        f"{t_direct[0] / t_calibrate[0]:.1f}× faster than the direct way in this run.",
        f"Largest relative change of Σ from {REFERENCE_IMAGES} to {n} images over all layers: "
        f"{convergence:.1e}.",
        "CPU s is the process's CPU time over both threads: on a shared, busy machine it tracks the "
        "work done better than wall time (on an idle 2-core machine, wall ≈ CPU / 2). "
        "The ratios are measured side by side in one run.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(__file__).parent / "results" / "calibrate.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
