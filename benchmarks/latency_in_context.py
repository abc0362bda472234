"""Layer times measured INSIDE the running network, as a latency model (issue 17's next step).

The latency table of `lr.deploy` times each layer alone and predicts a network from those times
with one calibrated scale; its predictions miss low budgets (benchmarks/results/deploy_3.md).
Here each block conv of ResNet-56 is timed inside whole networks instead (forward hooks reading
the thread's CPU time), once in the dense network and once in a network with every conv
Tucker-2-factorized at each candidate fraction of its full ranks; a network mixing dense and
factorized layers is then predicted as (dense network − its convs) + the sum of its convs'
in-network times, with no scale, and measured. Random weights (time does not depend on them),
BatchNorm folded, channels-last, no merging; batch 128, one thread.

Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/latency_in_context.py
Writes benchmarks/results/latency_in_context.md.
"""
import os
import pathlib
import statistics
import time

import torch
import torch.nn as nn

import lowrank as lr

REPS = 8
FRACTIONS = (0.125, 0.25, 0.5)
EXCLUDE = ["conv1", "linear"]
torch.set_num_threads(1)
lr.deploy.retain_memory()
dense = lr.models.resnet56().eval()
names = lr.plan(dense, "tucker2", 1, exclude=EXCLUDE).compressed()
full = {n: [dense.get_submodule(n).out_channels, dense.get_submodule(n).in_channels] for n in names}
x = torch.zeros(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)


def build(plan):
    """The dense network (plan None) or one compressed by ``plan`` (random weights), BN folded,
    channels-last."""
    model = dense
    if plan is not None:
        model = lr.surgery.structure(dense, plan)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
    return lr.deploy.channels_last(lr.fold_bn(model)).eval()


def ranks(fraction):
    """Tucker-2 ranks: ``fraction`` of both full ranks of every block conv."""
    return {n: [max(1, round(fraction * c)) for c in full[n]] for n in names}


def in_context(model):
    """({block conv: median seconds inside the network}, median seconds of the network)."""
    spans, start = {n: [] for n in names}, {}
    hooks = []
    for n in names:
        m = model.get_submodule(n)
        hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=n: start.__setitem__(n, time.thread_time())))
        hooks.append(m.register_forward_hook(lambda _m, _a, _o, n=n: spans[n].append(time.thread_time() - start[n])))
    nets = []
    with torch.no_grad():
        model(x)   # warm-up
        for _ in range(REPS):
            t = time.thread_time()
            model(x)
            nets.append(time.thread_time() - t)
    for h in hooks:
        h.remove()
    return {n: statistics.median(v[1:]) for n, v in spans.items()}, statistics.median(nets)


dense_layers, dense_net = in_context(build(None))
table = {f: in_context(build(lr.plan(dense, "tucker2", ranks(f), exclude=EXCLUDE)))[0] for f in FRACTIONS}
rest = dense_net - sum(dense_layers.values())
lines = ["# Layer times inside the network as a latency model (ResNet-56, Tucker-2, batch 128)", "",
         f"{lr.measure.machine()}, 1 thread, thread CPU time, medians of {REPS} forward passes; load average "
         f"{os.getloadavg()[0]:.1f}. Dense network {1e3 * dense_net:.0f} ms, its block convs "
         f"{1e3 * sum(dense_layers.values()):.0f} ms inside it, the rest {1e3 * rest:.0f} ms. Each trial "
         f"chooses every block conv at random among dense and Tucker-2 at {FRACTIONS} of its full ranks.", "",
         "| trial | predicted / dense | measured / dense | measured / predicted |", "|---|---|---|---|"]
generator = torch.Generator().manual_seed(0)
for trial in range(6):
    choice = {n: [None, *FRACTIONS][int(torch.randint(0, 4, (1,), generator=generator))] for n in names}
    plan = lr.plan(dense, "tucker2", {n: ranks(f)[n] for n, f in choice.items() if f is not None},
                   exclude=EXCLUDE)
    predicted = rest + sum(dense_layers[n] if f is None else table[f][n] for n, f in choice.items())
    measured = in_context(build(plan))[1]
    lines.append(f"| {trial} | {predicted / dense_net:.3f} | {measured / dense_net:.3f} | "
                 f"{measured / predicted:.3f} |")
    print(lines[-1], flush=True)
out = pathlib.Path(__file__).parent / "results" / "latency_in_context.md"
out.write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
