"""Rank selection head to head (issue 15): every method at the same budget, BatchNorm re-estimated,
accuracy before and after the book's one fine-tuning recipe, paired with the dense network.

Real pretrained CIFAR-10 ResNet-20 and ResNet-56, their block convs (the stem and the classifier
stay dense) compressed to a share of their parameters (or MACs); accuracy on the 1,017 offline
test images, paired with the dense network on the same images (`lr.measure.paired`).

Every compressed model gets its BatchNorm statistics re-estimated on 1,024 augmented training
images (`lr.recalibrate_bn`) before it is measured ("before"); the accuracy without it is listed
too. "after": the book's recipe from there, `lr.train.fit(small, cifar10("train", augment=True),
teacher=dense)` with fit's defaults (3 epochs, distillation), except that CP networks are trained
at lr 1e-3 (`CP_LR`; chapter 4: the recipe's 0.01 wrecks them); with `--epochs N` the rows are
fine-tuned N epochs and named "method (N epochs)". Methods (channel SVD unless said):
- uniform: the same share of every layer (`ranks=fraction`), plain SVD;
- energy: one ARSVD threshold τ for all layers, by bisection to the budget; plain SVD;
- greedy: the greedy energy-per-parameter allocator (`lr.ranks.budget`); plain SVD;
- VBMF: each layer's EVBMF rank (its own size; the others are re-run at that size);
- Σ-greedy: the greedy allocator on Σ-whitened spectra (`budget(..., stats=)`), Σ-weighted SVD;
- search, data-free: `lr.search(norm="data")` without data (asserted equal to Σ-greedy);
- search, data: `lr.search(norm="data", data=train)`, distillation, Σ-weighted SVD;
- search, data + EF: its plan compressed with error feedback (`lr.compress_sequential`);
- CP-EF: Σ-weighted CP (4-way) with error feedback at uniform ranks (`plan(model, "cp", fraction)`);
- CP search + EF: `lr.search` over the terms of one high-rank CP, with data, then CP-EF;
- RENE: the paper's method as published (CP3, its grid 10..100 step 10, f = 10, two steps of
  20 + 100 iterations, γ = 0.4, β = 0.8, SGD 1e-3, products of losses, α on the cross-entropy of
  training batches), then CP-ALS at the ranks it picks; its own size.
Times: rank selection ("select": calibration, search) and compression, wall-clock on this
machine, with the machine and its load printed in the results.

Run (resumable: finished rows are kept in benchmarks/results/rank_search_<net>.json):
  LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/rank_search.py --net resnet20
  LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/rank_search.py --net resnet56
  ... --net resnet20 --budgets 0.28,0.2 --finetune 0.28,0.2 --only CP-EF --epochs 20   # the long rows
  .venv/bin/python benchmarks/rank_search.py --report        # writes rank_search.md from the JSON
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime starts

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call  # noqa: E402

import lowrank as lr  # noqa: E402
from lowrank.decompose.cp import CPDegeneracyWarning, conv_cp, cp_reconstruct  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
BLOCKS = dict(exclude=["conv1", "linear"])
CALIBRATION, RECALIBRATION = 256, 1024
RECIPE_EPOCHS = 3
CP_LR = 1e-3    # chapter 4: the recipe's lr 0.01 wrecks a CP network (90.4 % at 1e-3, 30.8 % at 0.01)
test = lr.data.cifar10("test", limit=1017)
train = lr.data.cifar10("train")
augmented = lr.data.cifar10("train", augment=True)


# ---------------------------------------------------------------- the paper's method, as published
def rene_ranks(model, names, data, gamma=0.4, beta=0.8, grid=(10, 100, 10), factor=10, warmup=20, iters=100,
               lr_=1e-3, batch_size=128, als_iters=30, seed=0):
    """RENE (Aghababaei-Harandi & Amini, arXiv 2409.03555, authors' code github.com/aah94/RENE):
    per layer one CP3 per candidate rank, logits α, W_mix = Σ_r softmax(α)_r Ŵ_r; weight step on
    [Σ ‖W − W_mix‖²]·L_r, α step on CE(batch)·L_r, L_r = γ Σ_i (Σ_r p_r r / max R_i)^β; SGD with
    Nesterov momentum; argmax, then the grid narrowed to [r̄ − s/2, r̄ + s/2] with step s/f.
    Returns {name: rank} and the coefficients of the last step."""
    torch.manual_seed(seed)
    student = copy.deepcopy(model).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    dense = {n: model.get_submodule(n).weight.detach() for n in names}
    top = {n: max(1, W.numel() // (W.shape[0] + W.shape[1] + W.shape[2] * W.shape[3])) for n, W in dense.items()}
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    low, high, step = grid
    candidates = {n: sorted({min(max(r, 1), top[n]) for r in range(low, high + 1, step)}) for n in names}
    while True:
        branches, alphas = {}, {}
        for n in names:
            W = dense[n]
            fits = []
            for r in candidates[n]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CPDegeneracyWarning)
                    res = conv_cp(W.double(), r, form="3way", n_iter_max=als_iters)
                A_T, A_S, A_K = [f.float().clone() for f in res.factors]
                fits.append([(A_T * res.weights.float()).requires_grad_(), A_S.requires_grad_(), A_K.requires_grad_()])
            branches[n], alphas[n] = fits, torch.zeros(len(fits), requires_grad=True)
        weights = [t for n in names for b in branches[n] for t in b]
        opt_w = torch.optim.SGD(weights, lr=lr_, momentum=0.9, nesterov=True)
        opt_a = torch.optim.SGD(list(alphas.values()), lr=lr_, momentum=0.9, nesterov=True)

        def mixture(n):
            p = alphas[n].softmax(0)
            shape = dense[n].shape
            return sum(pr * cp_reconstruct(torch.ones(b[0].shape[1]), b).reshape(shape)
                       for pr, b in zip(p, branches[n]))

        def rank_loss():
            return gamma * sum(((alphas[n].softmax(0) * torch.tensor(candidates[n], dtype=torch.float32)
                                 / max(candidates[n])).sum()) ** beta for n in names)

        for t in range(warmup + iters):
            opt_w.zero_grad()
            loss_w = sum((dense[n] - mixture(n)).square().sum() for n in names) * rank_loss()
            loss_w.backward()
            opt_w.step()
            if t >= warmup:
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                opt_a.zero_grad()
                mixed = {f"{n}.weight": mixture(n) for n in names}
                loss_a = F.cross_entropy(functional_call(student, mixed, (x,)), y) * rank_loss()
                loss_a.backward()
                opt_a.step()
        chosen = {n: candidates[n][int(alphas[n].argmax())] for n in names}
        coefficients = {n: alphas[n].softmax(0).tolist() for n in names}
        next_step = step // factor
        if next_step < 1:
            return chosen, coefficients
        half = step / 2
        candidates = {n: sorted({min(max(r, 1), top[n]) for r in range(max(1, math.floor(chosen[n] - half)),
                                                                        math.ceil(chosen[n] + half) + 1, next_step)})
                      for n in names}
        step = next_step


# ---------------------------------------------------------------------------------- the methods
def method_rows(model, name, fraction, by, stats, only=None, done=()):
    """(method, plan, compress function, seconds to select) for each method at this budget that
    is not ``done`` (a set of method names)."""
    def timed(f):
        start = time.perf_counter()
        out = f()
        return out, time.perf_counter() - start

    def plain(plan):
        return lambda: lr.compress(model, plan, progress=False)

    def sigma(plan):
        return lambda: lr.compress(model, plan, stats, progress=False)

    def feedback(plan):
        return lambda: lr.compress_sequential(model, plan, train, limit=CALIBRATION, progress=False)

    def wanted(m):
        return (only is None or m in only) and m not in done

    if by == "params" and wanted("uniform"):
        plan, s = timed(lambda: lr.plan(model, "svd", fraction, **BLOCKS))
        yield "uniform", plan, plain(plan), s
    if wanted("energy"):
        plan, s = timed(lambda: lr.plan(model, "svd", lr.ranks.budget(fraction, by=by, method="bisect"), **BLOCKS))
        yield "energy", plan, plain(plan), s
    if wanted("greedy"):
        plan, s = timed(lambda: lr.plan(model, "svd", lr.ranks.budget(fraction, by=by), **BLOCKS))
        yield "greedy", plan, plain(plan), s
    greedy_sigma = None
    if wanted("Σ-greedy") or wanted("search, data-free"):
        greedy_sigma, s = timed(lambda: lr.plan(model, "svd", lr.ranks.budget(fraction, by=by, stats=stats),
                                                norm="data", **BLOCKS))
        if wanted("Σ-greedy"):
            yield "Σ-greedy", greedy_sigma, sigma(greedy_sigma), s
    if wanted("search, data-free"):
        found, s = timed(lambda: lr.search(model, "svd", fraction, by=by, norm="data", stats=stats,
                                           progress=False, **BLOCKS))
        assert found.plan == greedy_sigma, "the data-free search should be the Σ-greedy allocation"
        yield "search, data-free", found.plan, "same as Σ-greedy", s
    if wanted("search, data") or wanted("search, data + EF"):
        found, s = timed(lambda: lr.search(model, "svd", fraction, augmented, by=by, norm="data", stats=stats,
                                           progress=False, **BLOCKS))
        if wanted("search, data"):
            yield "search, data", found.plan, sigma(found.plan), s
        if wanted("search, data + EF"):
            yield "search, data + EF", found.plan, feedback(found.plan), s
    if by == "params" and wanted("CP-EF"):
        plan, s = timed(lambda: lr.plan(model, "cp", fraction, norm="data", **BLOCKS))
        yield "CP-EF", plan, feedback(plan), s
    if by == "params" and wanted("CP search + EF"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CPDegeneracyWarning)
            found, s = timed(lambda: lr.search(model, "cp", fraction, augmented, norm="data", stats=stats,
                                               progress=False, **BLOCKS))
        yield "CP search + EF", found.plan, feedback(found.plan), s


def own_size_rows(model, name, stats, only=None):
    """The methods that choose their own size: VBMF, and RENE as published (ResNet-20)."""
    if only is None or "VBMF" in only:
        start = time.perf_counter()
        plan = lr.plan(model, "svd", lr.ranks.vbmf(), **BLOCKS)
        yield "VBMF", plan, lambda: lr.compress(model, plan, progress=False), time.perf_counter() - start
    if name == "resnet20" and (only is None or "RENE (as published)" in only):
        names = lr.plan(model, "cp3", 1, **BLOCKS).compressed()
        start = time.perf_counter()
        ranks, _ = rene_ranks(model, names, train)
        plan = lr.plan(model, "cp3", ranks, **BLOCKS)
        yield "RENE (as published)", plan, lambda: lr.compress(model, plan, progress=False), \
            time.perf_counter() - start


# ---------------------------------------------------------------------------------------- run
def share(plan, key):
    """Share of the planned layers' dense cost that the plan keeps."""
    return sum(e[key][1] for e in plan.layers.values()) / sum(e[key][0] for e in plan.layers.values())


_dense_correct = {}


def paired_with_dense(small, model):
    """(accuracy, paired difference with the dense model, its s.e., which images are right)."""
    if id(model) not in _dense_correct:
        predicted, truth = lr.measure.predictions(model, test)
        _dense_correct[id(model)] = predicted == truth
    predicted, truth = lr.measure.predictions(small, test)
    p = lr.measure.Paired.from_correct(predicted == truth, _dense_correct[id(model)])
    return float((predicted == truth).double().mean()), p.difference, p.se, correct_string(predicted == truth)


def correct_string(correct) -> str:
    """Which test images a model gets right, as a string of 0/1 (to pair any two rows later)."""
    return "".join("1" if c else "0" for c in correct.tolist())


def finetune_lr(method) -> float:
    """The recipe's learning rate, except for CP networks (`CP_LR`)."""
    return CP_LR if method.startswith("CP") or method.startswith("RENE") else 0.01


def complete(row, finetune) -> bool:
    """A row measured, and fine-tuned at its method's learning rate if asked."""
    return "before_correct" in row and (not finetune or row.get("finetune_lr") == finetune_lr(row["method"]))


def labelled(method, epochs) -> str:
    """A method's name in the results: fine-tuned longer than the recipe's 3 epochs, it says so."""
    return method if epochs == RECIPE_EPOCHS else f"{method} ({epochs} epochs)"


def measure(model, name, method, fraction, by, plan, compress, select_s, finetune, rows, path,
            epochs=RECIPE_EPOCHS):
    key = f"{name}|{by}|{fraction:.4f}|{labelled(method, epochs)}"
    if key in rows and complete(rows[key], finetune):
        return rows[key]
    if compress == "same as Σ-greedy":     # the same plan: the same model, only the time differs
        rows[key] = {**rows[f"{name}|{by}|{fraction:.4f}|{labelled('Σ-greedy', epochs)}"],
                     "method": labelled(method, epochs), "select_s": select_s}
        path.write_text(json.dumps(rows, indent=1))
        return rows[key]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        small = compress()
    compress_s = time.perf_counter() - start
    torch.manual_seed(0)
    recalibrated = lr.recalibrate_bn(small, augmented, limit=RECALIBRATION)
    row = dict(net=name, by=by, budget=fraction, method=labelled(method, epochs), params=share(plan, "params"),
               macs=share(plan, "macs"), select_s=select_s, compress_s=compress_s,
               threads=torch.get_num_threads(), load=os.getloadavg()[0],
               no_recalibration=float(lr.measure.accuracy(small, test)),
               ranks={n: e["rank"] if e["method"] != "dense" else "dense" for n, e in plan.items()})
    row["before"], row["before_diff"], row["before_se"], row["before_correct"] = paired_with_dense(recalibrated,
                                                                                                  model)
    if finetune:
        start, cpu = time.perf_counter(), time.process_time()
        row["finetune_lr"], row["finetune_epochs"] = finetune_lr(method), epochs
        lr.train.fit(recalibrated, augmented, teacher=model, lr=row["finetune_lr"], epochs=epochs,
                     progress=False)
        row["finetune_s"], row["finetune_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        row["after"], row["after_diff"], row["after_se"], row["after_correct"] = paired_with_dense(recalibrated,
                                                                                                  model)
    rows[key] = row
    path.write_text(json.dumps(rows, indent=1))
    print(f"{name} {by} {fraction:.3f} {row['method']:22s} kept {row['params']:.3f} params {row['macs']:.3f} MACs | "
          f"no BN {100 * row['no_recalibration']:.2f} | before {100 * row['before']:.2f} "
          + (f"| after {100 * row['after']:.2f} " if finetune else "")
          + f"| select {select_s:.0f} s", flush=True)
    return row


def run(args):
    path = RESULTS / f"rank_search_{args.net}.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(args.threads)
    model = getattr(lr.models, args.net)()
    dense = lr.measure.accuracy(model, test)
    predicted, truth = lr.measure.predictions(model, test)
    rows[f"{args.net}|dense"] = dict(net=args.net, method="dense", before=float(dense),
                                     correct=correct_string(predicted == truth),
                                     machine=lr.measure.machine(), threads=args.threads,
                                     load=os.getloadavg()[0])
    only = set(args.only.split(";")) if args.only else None
    stats = lr.calibrate(model, train, limit=CALIBRATION, progress=False)
    budgets = [(float(b), "params") for b in args.budgets.split(",")] + \
              [(float(b), "macs") for b in args.mac_budgets.split(",") if b]
    finetune = {float(b) for b in args.finetune.split(",") if b}
    tuned = set(args.tuned.split(";"))
    def done(fraction, by):
        """Methods whose rows at this budget are complete (measured, and fine-tuned if asked)."""
        suffix = labelled("", args.epochs)
        rows_here = {k.split("|")[3].removesuffix(suffix): r for k, r in rows.items()
                     if k.startswith(f"{args.net}|{by}|{fraction:.4f}|") and k.endswith(suffix)}
        return {m for m, r in rows_here.items()
                if complete(r, by == "params" and fraction in finetune and m in tuned)}

    for fraction, by in budgets:
        for method, plan, compress, select_s in method_rows(model, args.net, fraction, by, stats, only,
                                                            done(fraction, by)):
            measure(model, args.net, method, fraction, by, plan, compress, select_s,
                    by == "params" and fraction in finetune and method in tuned, rows, path, args.epochs)
    for method, plan, compress, select_s in own_size_rows(model, args.net, stats, only):
        row = measure(model, args.net, method, 0.0, "own", plan, compress, select_s, method in tuned, rows,
                      path)
        size = round(row["params"], 4)
        if method == "VBMF" and all(abs(size - b) > 0.005 for b, by in budgets if by == "params"):
            # the budget methods at VBMF's size (unless a budget above is that size already)
            for m2, plan2, compress2, s2 in method_rows(model, args.net, size, "params", stats,
                                                        {"greedy", "Σ-greedy", "search, data", "CP-EF"}):
                measure(model, args.net, m2, size, "params", plan2, compress2, s2, m2 in tuned, rows,
                        path)


# ------------------------------------------------------------------------------------- report
def report():
    rows = {k: r for path in sorted(RESULTS.glob("rank_search_*.json")) for k, r in json.loads(path.read_text()).items()}
    pts = lambda x: f"{100 * x:.2f}"
    lines = ["# Rank selection head to head (issue 15)", "",
             "Block convs of the pretrained CIFAR-10 ResNets; every model's BatchNorm re-estimated on "
             f"{RECALIBRATION:,} augmented training images before it is measured (**before**; the column "
             "*no BN* is without that); **after**: the book's recipe `lr.train.fit(small, "
             "cifar10('train', augment=True), teacher=dense)` (3 epochs, distillation) from there. Accuracy "
             "on the 1,017 offline test images; Δ = paired difference with the dense network on the same "
             "images ± its standard error (points). Kept: share of the block convs' parameters / MACs. "
             "select: wall-clock seconds to choose the ranks (search included), on the machine below. "
             f"CP networks (CP-EF, CP search + EF, RENE) are fine-tuned at lr {CP_LR:g} instead of the recipe's "
             "0.01, which wrecks them (chapter 4); a method named '(N epochs)' is fine-tuned N epochs instead "
             "of 3. ft CPU: the fine-tuning's CPU seconds (all threads).", ""]
    for net in ("resnet20", "resnet56"):
        base = rows.get(f"{net}|dense")
        if base is None:
            continue
        lines += [f"## {net}: dense {pts(base['before'])} %", "",
                  f"Machine: {base['machine']}. Rows were recorded over several runs, with 1 or 2 threads, on "
                  f"a machine shared with other jobs (the latest run: {base['threads']} thread(s), load average "
                  f"{base['load']:.1f} at its start): times are indicative.", "",
                  "| budget | method | kept params | kept MACs | no BN | before | Δ before | after | Δ after | "
                  "select (s) | compress (s) | ft CPU (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        mine = [r for k, r in rows.items() if k.startswith(net + "|") and r["method"] != "dense"]
        order = lambda r: ({"own": 2, "params": 0, "macs": 1}[r["by"]], -r["budget"])
        for r in sorted(mine, key=order):
            budget = "own size" if r["by"] == "own" else f"{r['budget']:.0%} {r['by']}"
            after = (pts(r["after"]), f"{100 * r['after_diff']:+.2f} ± {100 * r['after_se']:.2f}") \
                if "after" in r else ("", "")
            lines.append(f"| {budget} | {r['method']} | {r['params']:.3f} | {r['macs']:.3f} | "
                         f"{pts(r['no_recalibration'])} | {pts(r['before'])} | "
                         f"{100 * r['before_diff']:+.2f} ± {100 * r['before_se']:.2f} | {after[0]} | {after[1]} | "
                         f"{r['select_s']:.0f} | {r['compress_s']:.0f} | "
                         + (f"{r['finetune_cpu_s']:.0f} |" if "finetune_cpu_s" in r else " |"))
        lines.append("")
    lines += ["Command: `LOWRANK_DATA=/work/shared/data .venv/bin/python benchmarks/rank_search.py --net resnet20` "
              "(then `--net resnet56`, see the script for the budgets), then `--report`."]
    (RESULTS / "rank_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="resnet20")
    parser.add_argument("--budgets", default="0.5,0.3,0.2")
    parser.add_argument("--mac-budgets", default="0.3")
    parser.add_argument("--finetune", default="0.3,0.2", help="budgets whose models are fine-tuned")
    parser.add_argument("--only", default="", help="methods separated by ';' (default: all)")
    parser.add_argument("--tuned", default="uniform;greedy;Σ-greedy;search, data;search, data + EF;CP-EF;VBMF;"
                        "RENE (as published)", help="methods (';') whose models are fine-tuned, at --finetune")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=RECIPE_EPOCHS,
                        help="fine-tuning epochs (the recipe's 3; other counts are rows of their own)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    report() if args.report else run(args)
