"""One-shot vs sequential (error-feedback) data-informed Tucker-2 of ResNet-20 and ResNet-56.

Real pretrained weights, calibration on the first 256 images of the offline CIFAR-10 training
subset, accuracy on the 1,017 offline test images; block convs at ranks keeping 50 % of their
parameters, no fine-tuning. Side by side in one run, for the Σ-ALS at 3 and at 20 sweeps:
- one-shot: `lowrank.calibrate` + `lowrank.compress(..., stats=...)` (Σ from the dense network);
- sequential: `lowrank.compress_sequential` (each layer fitted to the compressed network's inputs);
wall time (2 threads) and accuracy, and the plain HOSVD model for reference. At 3 sweeps also
`compress_sequential` with its replay switched off (every step recomputes the network up to the
layer): the same model, to time what replaying the unchanged modules saves.
Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/sequential.py
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime starts

import pathlib  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import lowrank as lr  # noqa: E402
from lowrank.sequential import _Replay  # noqa: E402

IMAGES, KEEP = 256, 0.5
torch.set_num_threads(2)
test, train = lr.data.cifar10("test"), lr.data.cifar10("train")
lines = ["# One-shot vs sequential data-informed Tucker-2", "",
         f"Block convs at {KEEP:.0%} of their parameters, no fine-tuning; Σ from {IMAGES} CIFAR-10 "
         f"training images; accuracy on the {len(test):,} offline test images; wall time on 2 threads.", "",
         "| model | dense | plain HOSVD | Σ-ALS sweeps | one-shot | time | sequential | time | "
         "time without replay |",
         "|---|---|---|---|---|---|---|---|---|"]
for name in ("resnet20", "resnet56"):
    model = getattr(lr.models, name)()
    dense = lr.measure.accuracy(model, test)
    plain = lr.measure.accuracy(lr.compress(model, lr.plan(model, "tucker2", KEEP, exclude=["conv1", "linear"]),
                                            progress=False), test)
    plan = lr.plan(model, "tucker2", KEEP, exclude=["conv1", "linear"], norm="data")
    for sweeps in (3, 20):
        start = time.perf_counter()
        stats = lr.calibrate(model, train, limit=IMAGES, progress=False)
        one_shot = lr.compress(model, plan, stats=stats, progress=False, n_iter=sweeps)
        one_shot_s = time.perf_counter() - start
        start = time.perf_counter()
        sequential = lr.compress_sequential(model, plan, train, limit=IMAGES, progress=False, n_iter=sweeps)
        sequential_s = time.perf_counter() - start
        no_replay = ""
        if sweeps == 3:
            freeze, _Replay.freeze = _Replay.freeze, lambda self, remaining: None
            start = time.perf_counter()
            recomputed = lr.compress_sequential(model, plan, train, limit=IMAGES, progress=False, n_iter=sweeps)
            no_replay = f"{time.perf_counter() - start:.0f} s"
            _Replay.freeze = freeze
            assert all(torch.equal(a, b) for a, b in zip(sequential.state_dict().values(),
                                                         recomputed.state_dict().values()))
        row = (f"| {name} | {100 * dense:.2f} % | {100 * plain:.2f} % | {sweeps} | "
               f"{100 * lr.measure.accuracy(one_shot, test):.2f} % | {one_shot_s:.0f} s | "
               f"{100 * lr.measure.accuracy(sequential, test):.2f} % | {sequential_s:.0f} s | {no_replay} |")
        print(row, flush=True)
        lines.append(row)
out = pathlib.Path(__file__).parent / "results" / "sequential.md"
out.write_text("\n".join(lines) + "\n")
print(f"written to {out}")
