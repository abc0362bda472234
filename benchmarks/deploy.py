"""From MACs to milliseconds: how much of a compressed ResNet's MAC reduction becomes time on a CPU.

Inputs: the real pretrained CIFAR-10 ResNet-20 and ResNet-56 (Idelbayev's checkpoints) and the
offline CIFAR-10 images. Measured side by side in one run, on ONE CPU thread, every time the CPU
time of the thread that runs the model (`clock="cpu"`: on a shared machine it leaves out the time
spent waiting for a core; on a quiet one it equals the wall time), with glibc told to keep freed
memory (`lr.deploy.retain_memory`, section 1 measures what that changes):

1. Fresh pages: the dense ResNet-56, BN folded and channels-last, with glibc's start-up setting
   (`retain_memory(False)`) and with memory retained.
2. Runtimes: dense, Tucker-2, channel SVD and CP (4-way) keeping 30 % of the block convs'
   parameters (plain decompositions: timing only, accuracy not claimed), under eager NCHW,
   channels-last, BN folded (+ channels-last), factors merged where measured faster
   (`lr.deploy.optimize` with a LayerTimes), ONNX Runtime (from the optimized model) and
   torch.compile (inductor, from the optimized model); batch 1 and 128. Each runtime against its
   own dense model; the MAC reduction is that of what runs (merged factors run more MACs).
3. Latency budgets on ResNet-56 (batch 128): the per-layer table, `lr.ranks.budget(f,
   by="latency")` for f = 0.5, 0.6, 0.75, predicted against measured (whole networks side by side);
   and the parameter budget whose predicted time is the same (bisection on its fraction).
4. The target path: ResNet-56 under the latency budget that gives ≥ 3× fewer MACs, data-informed
   (lr.compress_sequential, 256 images), then fine-tuned with the book's recipe
   (lr.train.fit(small, cifar10("train", augment=True), teacher=dense), fit's defaults); accuracy
   paired against the dense model on the 1,017 test images; speed-ups at batch 1 and 128.

Run: LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/deploy.py [--no-compile] [--no-finetune]
Writes benchmarks/results/deploy.md (with --sections 3: deploy_3.md, and so on).
"""
import argparse
import os
import pathlib
import tempfile
import time

import torch

import lowrank as lr

BATCHES = (1, 128)
KEEP = 0.3
METHODS = {"Tucker-2": "tucker2", "channel SVD": "svd", "CP": "cp"}
EXCLUDE = ["conv1", "linear"]
BUDGETS = (0.5, 0.6, 0.7, 0.75)
CALIBRATIONS = 3
CLOCK = dict(threads=1, clock="cpu")


def timed(models, batch, rounds=5, min_run_time=0.3):
    return {k: v.seconds for k, v in lr.measure.latencies(models, batch, rounds=rounds, min_run_time=min_run_time,
                                                          **CLOCK).items()}


def fresh_pages(lines):
    """Section 1: the same dense network before and after lr.deploy.retain_memory."""
    model = lr.deploy.optimize(lr.models.resnet56())
    lr.deploy.retain_memory(False)   # glibc's start-up setting (it raises it as a process runs)
    before = {b: timed({"dense": model}, b, rounds=3)["dense"] for b in BATCHES}
    applied = lr.deploy.retain_memory()
    after = {b: timed({"dense": model}, b, rounds=3)["dense"] for b in BATCHES}
    lines += ["## 1. Fresh pages", "",
              f"Dense ResNet-56, BN folded, channels-last; retain_memory took effect: {applied}.", "",
              "| batch | glibc start-up setting (ms) | memory retained (ms) | ratio |", "|---|---|---|---|"]
    lines += [f"| {b} | {1e3 * before[b]:.2f} | {1e3 * after[b]:.2f} | {before[b] / after[b]:.2f}× |" for b in BATCHES]
    lines.append("")


def runtimes(depth, times, compile_models, lines, tmp):
    """Section 2: each compressed model under each runtime, against that runtime's dense model."""
    dense = getattr(lr.models, f"resnet{depth}")().eval()
    models = {"dense": dense}
    for label, method in METHODS.items():
        plan = lr.plan(dense, method, KEEP, exclude=EXCLUDE)
        models[label] = lr.compress(dense, plan, progress=False)
    variants, macs = {}, {}
    for label, model in models.items():
        optimized = lr.deploy.optimize(model, times=times)
        onnx_model = lr.deploy.OnnxModel(lr.deploy.export_onnx(optimized, tmp / f"{depth}-{label}.onnx"))
        x = torch.stack([lr.data.cifar10("test", limit=64)[i][0] for i in range(64)])
        with torch.no_grad():
            for other in (optimized, onnx_model):
                torch.testing.assert_close(other(x), model(x), rtol=1e-3, atol=1e-3)
        runs = {"eager NCHW": model, "channels-last": lr.deploy.channels_last(model),
                "BN folded + channels-last": lr.deploy.channels_last(lr.fold_bn(model)),
                "factors merged (optimize)": optimized, "ONNX Runtime": onnx_model}
        if compile_models and label in ("dense", "Tucker-2"):
            runs["torch.compile (inductor)"] = torch.compile(optimized)
        for runtime, m in runs.items():
            variants[runtime, label] = m
            merged = runtime in ("factors merged (optimize)", "ONNX Runtime", "torch.compile (inductor)")
            macs[runtime, label] = lr.measure.macs(optimized if merged else model)
    compiled = [k for k in variants if k[0] == "torch.compile (inductor)"]
    for k in compiled:   # compile once per batch size before timing
        start = time.perf_counter()
        with torch.no_grad():
            for b in BATCHES:
                variants[k](torch.zeros(b, 3, 32, 32))
        print(f"ResNet-{depth} {k[1]}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    seconds = {b: timed({f"{r}|{m}": v for (r, m), v in variants.items()}, b) for b in BATCHES}
    lines += [f"### ResNet-{depth}", "",
              "| runtime | model | MAC reduction | " + " | ".join(
                  f"b{b} (ms) | speed-up b{b} | ÷ MAC red. b{b}" for b in BATCHES) + " |",
              "|---|---|---|" + "---|---|---|" * len(BATCHES)]
    rows = []
    for (runtime, label) in variants:
        reduction = macs[runtime, "dense"] / macs[runtime, label]
        cells = [runtime, label, f"{reduction:.2f}×"]
        for b in BATCHES:
            t, base = seconds[b][f"{runtime}|{label}"], seconds[b][f"{runtime}|dense"]
            cells += [f"{1e3 * t:.2f}", f"{base / t:.2f}×", f"{base / t / reduction:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    lines += rows + [""]
    print("\n".join(rows), flush=True)


def budgets(times, lines):
    """Section 3: latency budgets on ResNet-56, predicted against measured."""
    dense = lr.models.resnet56().eval()
    reference = lr.plan(dense, "tucker2", 0.5, exclude=EXCLUDE)
    start = time.perf_counter()
    table = lr.deploy.latency_table(dense, reference, times)
    lines += ["## 3. Latency budgets (ResNet-56, Tucker-2, batch 128)", "",
              f"Latency table of {len(table.layers)} layers measured in {time.perf_counter() - start:.0f} s "
              f"(network {1e3 * table.network:.1f} ms, scale {table.scale:.3f}). Plain Tucker-2 factors (timing "
              "only). `measured` is the whole compressed network's time over the dense one's, measured side by "
              "side; the table is calibrated (`table.calibrate`) on the plan the rule gives, then the rule "
              f"allocates again, {CALIBRATIONS} times; the parameter budget is the one whose predicted time "
              "equals the latency plan's.", "",
              "| budget | plan | block-conv params | MAC reduction | predicted | measured | within 5 % |",
              "|---|---|---|---|---|---|---|"]
    blocks = sum(e["params"][0] for e in reference.layers.values())
    rest = reference.model_params - blocks
    for fraction in BUDGETS:
        try:
            rule = lr.ranks.budget(fraction, by="latency", table=table)
            for _ in range(CALIBRATIONS):   # the scale at the ranks the rule gives, then allocate again
                table.calibrate(dense, lr.plan(dense, "tucker2", rule, exclude=EXCLUDE))
                rule = lr.ranks.budget(fraction, by="latency", table=table)
            latency_plan = lr.plan(dense, "tucker2", rule, exclude=EXCLUDE)
        except ValueError as error:   # below what the fastest rank of every layer gives
            lines.append(f"| {fraction} | latency | infeasible: {str(error).split(': ', 1)[-1]} | | | | no |")
            print(lines[-1], flush=True)
            continue
        lo, hi = 0.01, 1.0   # the parameter budget predicted to take as long
        for _ in range(7):
            mid = (lo + hi) / 2
            p = lr.plan(dense, "tucker2", lr.ranks.budget(mid), exclude=EXCLUDE)
            lo, hi = (mid, hi) if table.predict(p) <= rule.predicted else (lo, mid)
        param_plan = lr.plan(dense, "tucker2", lr.ranks.budget(lo), exclude=EXCLUDE)
        models = {"dense": lr.deploy.optimize(dense, times=times)}
        for name, plan in (("latency", latency_plan), ("params", param_plan)):
            models[name] = lr.deploy.optimize(lr.compress(dense, plan, progress=False), times=times)
        seconds = timed(models, 128)
        for name, plan in (("latency", latency_plan), ("params", param_plan)):
            predicted, measured = table.predict(plan) / table.network, seconds[name] / seconds["dense"]
            lines.append(f"| {fraction} | {name} | {(plan.params - rest) / blocks:.1%} | "
                         f"{plan.model_macs / plan.macs:.2f}× | {predicted:.3f} | {measured:.3f} | "
                         f"{'yes' if abs(measured / fraction - 1) <= 0.05 else 'no'} |")
            print(lines[-1], flush=True)
    lines.append("")
    return table


def target(table, times, finetune, compile_models, lines, tmp):
    """Section 4: ≥ 3× fewer MACs, accuracy within 1 point, and the speed-ups."""
    dense = lr.models.resnet56().eval()
    test, train = lr.data.cifar10("test", limit=1017), lr.data.cifar10("train", limit=5085)
    for fraction in (0.6, 0.55, 0.5, 0.45):
        plan = lr.plan(dense, "tucker2", lr.ranks.budget(fraction, by="latency", table=table), exclude=EXCLUDE,
                       norm="data")
        if plan.model_macs / plan.macs >= 3:
            break
    start = time.perf_counter()
    small = lr.compress_sequential(dense, plan, train, limit=256, progress=False, n_iter=3)
    before = lr.measure.paired(small, dense, test)
    seconds = time.perf_counter() - start
    if finetune:
        start = time.perf_counter()
        lr.train.fit(small, lr.data.cifar10("train", augment=True), teacher=dense, progress=False)
        seconds = time.perf_counter() - start
    after = lr.measure.paired(small, dense, test)
    optimized = lr.deploy.optimize(small, times=times)
    dense_optimized = lr.deploy.optimize(dense, times=times)
    runs = {"eager NCHW": (dense, small), "optimize": (dense_optimized, optimized),
            "ONNX Runtime": tuple(lr.deploy.OnnxModel(lr.deploy.export_onnx(m, tmp / f"target-{i}.onnx"))
                                  for i, m in enumerate((dense_optimized, optimized)))}
    if compile_models:
        runs["torch.compile (inductor)"] = (torch.compile(dense_optimized), torch.compile(optimized))
        with torch.no_grad():
            for m in runs["torch.compile (inductor)"]:
                for b in BATCHES:
                    m(torch.zeros(b, 3, 32, 32))
    lines += ["## 4. The target path (ResNet-56)", "",
              f"Latency budget {fraction} (the first of 0.6, 0.55, 0.5, 0.45 with ≥ 3× fewer MACs), Tucker-2, "
              f"data-informed with error feedback (256 images, 3 Σ-ALS sweeps); {plan.summary()}.",
              f"Accuracy minus dense, paired on the 1,017 test images: {before} without training"
              + (f"; after the book's fine-tuning recipe ({seconds:.0f} s): {after}." if finetune else "."), "",
              "| runtime | MAC reduction | speed-up b1 | speed-up b128 | ÷ MAC red. b128 |", "|---|---|---|---|---|"]
    for runtime, (d, s) in runs.items():
        merged = runtime != "eager NCHW"
        reduction = lr.measure.macs(dense) / lr.measure.macs(optimized if merged else small)
        speedups = {b: (lambda t: t["d"] / t["s"])(timed({"d": d, "s": s}, b)) for b in BATCHES}
        lines.append(f"| {runtime} | {reduction:.2f}× | {speedups[1]:.2f}× | {speedups[128]:.2f}× | "
                     f"{speedups[128] / reduction:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes to compile)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning of section 4")
    parser.add_argument("--sections", default="1,2,3,4",
                        help="which sections to run; a subset is written to deploy_<sections>.md")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",")}
    torch.set_num_threads(1)
    import onnxruntime

    lines = ["# From MACs to milliseconds: compressed ResNets on a CPU", "",
             f"Generated by `benchmarks/deploy.py`. {lr.measure.machine()}; torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}; 1 thread, times are the CPU time of that thread (`clock=\"cpu\"`), "
             "medians of 5 interleaved rounds (section 1: 3) of `torch.utils.benchmark` repeats.", ""]
    start = time.perf_counter()
    if 1 in sections:
        fresh_pages(lines)
    times = lr.deploy.LayerTimes(batch_size=128, refresh=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if 2 in sections:
            lines += ["## 2. Runtimes", "",
                      f"Block convs compressed to keep {KEEP:.0%} of their parameters (plain decompositions), "
                      "conv1 and the classifier dense. Speed-up: the runtime's dense model over the compressed "
                      "one; `÷ MAC red.` is 1.0 when time falls in proportion to the MACs that run. ONNX Runtime "
                      "and torch.compile run the optimized model (BN folded, factors merged where measured "
                      "faster).", ""]
            for depth in (20, 56):
                runtimes(depth, times, not args.no_compile, lines, tmp)
        if sections & {3, 4}:
            table = budgets(times, lines)
        if 4 in sections:
            target(table, times, not args.no_finetune, not args.no_compile, lines, tmp)
    lines.append(f"Total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f} "
                 "(timings are meaningful on an otherwise idle machine only).")
    name = "deploy.md" if sections == {1, 2, 3, 4} else f"deploy_{'_'.join(map(str, sorted(sections)))}.md"
    out = pathlib.Path(__file__).parent / "results" / name
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
