"""Plain vs data-informed SVD of the pretrained EfficientNet-Lite0 on the ImageNet sample.

No fine-tuning. Σ from the 500 images of the calibration half (`lr.data.imagenet_sample(224,
"calibration", "efficientnet_lite")`), accuracy on the 500 of the test half, paired with the
plain model at the same ranks (`lr.measure.paired`). Two plans: the 32 pointwise (1×1) convs at
ranks keeping a share of each layer's parameters (the classifier dense), and the classifier
alone. Also: the wall time of each compression (plain: SVDs; data-informed: calibration, timed
once, plus the Σ-weighted SVDs), the peak memory `lr.calibrate` adds at 224×224 for two batch
sizes (each in a fresh process), and error feedback (`lr.compress_sequential`) at one level on 64
images, with its time and memory.
Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/efficientnet_lite0.py
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime starts

import copy  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import lowrank as lr  # noqa: E402

POINTWISE, CLASSIFIER, SEQUENTIAL = (0.95, 0.9, 0.8, 0.6), (0.5, 0.3), 0.9
torch.set_num_threads(2)
test = lr.data.imagenet_sample(224, "test", "efficientnet_lite")
calibration = lr.data.imagenet_sample(224, "calibration", "efficientnet_lite")
model = lr.models.efficientnet_lite0()

CHILD = """
import sys, time, torch
import lowrank as lr
torch.set_num_threads(2)
model = lr.models.efficientnet_lite0()
data = lr.data.imagenet_sample(224, "calibration", "efficientnet_lite")
limit, batch = int(sys.argv[1]), int(sys.argv[2])
def resident(field):   # kB of VmRSS (now) or VmHWM (the peak) of this process
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:   # the peak restarts from now (not the images' loading)
    f.write("5")
before, start = resident("VmRSS"), time.perf_counter()
{work}
print(time.perf_counter() - start, (resident("VmHWM") - before) / 1024)
"""


def peak_memory(work: str, limit: int, batch: int):
    """(seconds, peak resident memory in MiB above the memory held once model and data are loaded) of ``work``
    (a line of Python), run in a fresh process on ``limit`` calibration images in batches of ``batch``."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD.format(work=work), str(limit), str(batch)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def correct(m):
    """Which test images ``m`` classifies correctly [500] (run channels-last: the same, faster on a CPU)."""
    predicted, truth = lr.measure.predictions(copy.deepcopy(m).to(memory_format=torch.channels_last), test,
                                              batch_size=50)
    return predicted == truth


dense = correct(model)
lines = ["# EfficientNet-Lite0 on the ImageNet sample: plain vs data-informed SVD", "",
         f"Pretrained EfficientNet-Lite0 ({lr.measure.params(model):,} parameters), no fine-tuning. Σ from the "
         f"{len(calibration)} calibration images, accuracy on the {len(test)} test images (dense: "
         f"{100 * dense.float().mean():.1f} %); data-informed − plain paired on the same images. "
         f"{torch.get_num_threads()} threads, {lr.measure.machine()}.", ""]

CALIBRATE = "lr.calibrate(model, data, limit=limit, batch_size=batch, progress=False)"
for batch in (8, 32):
    seconds, mib = peak_memory(CALIBRATE, 64, batch)
    lines.append(f"- `lr.calibrate` on 64 images at 224×224, batch size {batch}: {seconds:.0f} s, peak memory "
                 f"+{mib:.0f} MiB (a fresh process, above the loaded model and images)")
    print(lines[-1], flush=True)
start = time.perf_counter()
stats = lr.calibrate(model, calibration, batch_size=32, progress=False)
calibration_s = time.perf_counter() - start
lines += [f"- `lr.calibrate` on all {len(calibration)} images, batch size 32: {calibration_s:.0f} s", "",
          "| layers | kept per layer | params | MACs | plain | time | data-informed | time (+ calibration) "
          "| data − plain |", "|---|---|---|---|---|---|---|---|---|"]
print(lines[-3], flush=True)
for what, levels, selection in (("pointwise convs", POINTWISE, dict(exclude=["_fc"])),
                                ("classifier", CLASSIFIER, dict(include=["_fc"]))):
    for keep in levels:
        row = {}
        for norm in ("frobenius", "data"):
            plan = lr.plan(model, "svd", keep, input_size=(3, 224, 224), norm=norm, **selection)
            start = time.perf_counter()
            small = lr.compress(model, plan, stats if norm == "data" else None, progress=False)
            row[norm] = (plan, time.perf_counter() - start, correct(small))
        (plan, plain_s, plain), (_, data_s, data) = row["frobenius"], row["data"]
        paired = lr.measure.Paired.from_correct(data, plain)
        lines.append(f"| {what} | {keep:.0%} | {plan.params / plan.model_params:.1%} | "
                     f"{plan.macs / plan.model_macs:.1%} | {100 * plain.float().mean():.1f} % | {plain_s:.1f} s | "
                     f"{100 * data.float().mean():.1f} % | {data_s:.1f} s (+ {calibration_s:.0f} s) | "
                     f"{100 * paired.difference:+.1f} ± {100 * paired.se:.1f} |")
        print(lines[-1], flush=True)

plan = lr.plan(model, "svd", SEQUENTIAL, input_size=(3, 224, 224), norm="data", exclude=["_fc"])
one_shot = correct(lr.compress(model, plan, stats, progress=False))
small = lr.compress_sequential(model, plan, calibration, limit=64, batch_size=32, progress=False)
sequential = correct(small)
paired = lr.measure.Paired.from_correct(sequential, one_shot)
seconds, mib = peak_memory(f"plan = lr.plan(model, 'svd', {SEQUENTIAL}, input_size=(3, 224, 224), norm='data', "
                           "exclude=['_fc'])\nlr.compress_sequential(model, plan, data, limit=limit, "
                           "batch_size=batch, progress=False)", 64, 32)
lines += ["", f"- error feedback, pointwise convs at {SEQUENTIAL:.0%}: `lr.compress_sequential` on 64 calibration "
          f"images {100 * sequential.float().mean():.1f} % ({seconds:.0f} s, peak memory +{mib:.0f} MiB) vs "
          f"one-shot on 500 {100 * one_shot.float().mean():.1f} %: {100 * paired.difference:+.1f} ± "
          f"{100 * paired.se:.1f} points"]
print(lines[-1], flush=True)
out = pathlib.Path(__file__).parent / "results" / "efficientnet_lite0.md"
out.write_text("\n".join(lines) + "\n")
print(f"written to {out}")
