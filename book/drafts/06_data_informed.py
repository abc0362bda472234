# %% [markdown]
# # Data-informed norms
#
# Every decomposition so far chose its factors to be close to the *weights*: the truncated SVD,
# HOSVD and CP-ALS all minimise a Frobenius norm $\|W - \widetilde W\|_F$. But a network does not
# care about its weights, only about what its layers *output* on the images it will see. Two
# weight errors of the same size can do very different damage: an error in a direction that real
# inputs never visit is harmless, an error along the dominant directions of the data is not.
#
# Kalle et al. {cite}`kalle2025distribution` make this the objective: choose $\widetilde W$ to
# minimise the change of the layer's output on real inputs. This chapter derives the resulting
# *data-informed norm*, solves it in closed form for a matrix (the same step SVD-LLM calls
# truncation-aware whitening {cite}`wang2024svdllm`), uses alternating least squares for Tucker-2,
# and compresses the pretrained ResNet-20 and ResNet-56 with it — **without any fine-tuning**.

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import lowrank as lr
import lowrank.decompose.weighted as weighted
import lowrank.train
from lowrank.decompose.tucker import relative_error

torch.manual_seed(0)
start = time.time()
print("data root:", lr.storage.data_root().name, "| torch", torch.__version__.split("+")[0],
      "| threads:", torch.get_num_threads())

# %%
test = lr.data.cifar10("test", limit=1017)
train = lr.data.cifar10("train", limit=5085)                 # no augmentation: calibration data
resnet20, resnet56 = lr.models.resnet20(), lr.models.resnet56()
dense20, dense56 = lr.measure.accuracy(resnet20, test), lr.measure.accuracy(resnet56, test)
print("dense ResNet-20:", dense20, "| dense ResNet-56:", dense56)

# %% [markdown]
# ## Calibration: the statistics of each layer's inputs
#
# A convolution is a matrix $W$ of size $T \times (S k_h k_w)$ acting on the im2col patches $x$ of
# its input (one patch per output pixel). Replacing $W$ by $\widetilde W$ changes the output on
# input $x$ by $(W - \widetilde W)x$, so the mean squared change over the data is
#
# $$
# \mathbb E\,\|(W-\widetilde W)x\|^2 = \operatorname{tr}\big((W-\widetilde W)\,\Sigma\,(W-\widetilde W)^\top\big)
# = \|(W-\widetilde W)\Sigma^{1/2}\|_F^2,\qquad \Sigma = \mathbb E[x x^\top].
# $$
#
# Only the $d \times d$ matrix $\Sigma$ ($d = S k_h k_w$, at most 576 here) enters, never the
# activations themselves. `lr.calibrate` runs a calibration set through the model once with
# forward hooks and accumulates $\sum x x^\top$ per layer in float64. We use 256 CIFAR-10
# *training* images (the test images stay unseen); the last section checks how many are needed.
# Calibration is the expensive part of the method: about 10 ms per image for ResNet-56 on two
# cores, which is why we keep the count small.

# %%
t = time.time()
stats20 = lr.calibrate(resnet20, train, limit=256, batch_size=128, progress=False)
stats56 = lr.calibrate(resnet56, train, limit=256, batch_size=128, progress=False)
print(f"calibrated {len(stats20)} + {len(stats56)} layers on 256 images in {time.time() - t:.0f} s")
s = stats20["layer3.0.conv2"]
print("layer3.0.conv2: d =", s.dim, "| vectors averaged:", f"{s.count:,}", "| Σ:", tuple(s.sigma.shape))

# %% [markdown]
# ## Weight error is the wrong target
#
# First the identity above, on real activations: we catch the input of one layer for 64 test
# images, compress the layer with plain Tucker-2, and compare the actual change of its output
# with $\operatorname{tr}(E\Sigma E^\top)$, $E = W - \widetilde W$, $\Sigma$ from those very inputs.

# %%
name = "layer2.1.conv1"
conv = dict(resnet20.named_modules())[name]
caught = {}
hook = conv.register_forward_hook(lambda m, inp, out: caught.setdefault("x", inp[0]))
with torch.no_grad():
    resnet20(torch.stack([test[i][0] for i in range(64)]))
hook.remove()
x = caught["x"]

plan_t = lr.plan(resnet20, "tucker2", 0.5, exclude=["conv1", "linear"])
W = conv.weight.detach()
W_hat = lr.layers.Tucker2Conv2d.from_dense(conv, tuple(plan_t[name]["rank"])).weight.detach()
E = W - W_hat

change = F.conv2d(x, E, stride=conv.stride, padding=conv.padding)     # output change [N, T, H, W]
X = lr.stats.input_vectors(conv, x).double()                            # patches [n, d]
Sigma_batch = X.T @ X / len(X)
lhs = change.double().square().sum(1).mean()                            # E‖(W − W̃) x‖² per pixel
E2 = E.double().reshape(E.shape[0], -1)
rhs = torch.trace(E2 @ Sigma_batch @ E2.T)
print(f"mean squared output change {lhs:.6f}   tr(E Σ Eᵀ) {rhs:.6f}")
assert torch.allclose(lhs, rhs, rtol=1e-6)

# %% [markdown]
# Now for every block conv of ResNet-20, compressed by plain Tucker-2 and plain channel SVD with
# ranks that keep 50 % of the parameters: the relative weight error
# $\|E\|_F/\|W\|_F$ against the relative output error
# $\|E\Sigma^{1/2}\|_F/\|W\Sigma^{1/2}\|_F$ (`lr.decompose.weighted.weighted_error`, with
# $\Sigma$ from the 256 calibration images).

# %%
plan_s = lr.plan(resnet20, "svd", 0.5, exclude=["conv1", "linear"])
plain_t = lr.compress(resnet20, plan_t, progress=False)
plain_s = lr.compress(resnet20, plan_s, progress=False)
modules20 = dict(resnet20.named_modules())
errors = {}
for label, small, plan in [("Tucker-2", plain_t, plan_t), ("channel SVD", plain_s, plan_s)]:
    layers = dict(small.named_modules())
    errors[label] = [(relative_error(modules20[n].weight, layers[n].weight.detach()),
                      weighted.weighted_error(modules20[n].weight, layers[n].weight.detach(),
                                              stats20[n].sigma)) for n in plan.compressed()]

fig, ax = plt.subplots(figsize=(5.5, 4.5))
for (label, pairs), marker in zip(errors.items(), "os"):
    ax.scatter(*zip(*pairs), marker=marker, label=label, alpha=0.7)
ax.plot([0, 1], [0, 1], "k:", lw=1, label="output error = weight error")
ax.set(xlabel="relative weight error ‖E‖/‖W‖", ylabel="relative output error ‖EΣ½‖/‖WΣ½‖",
       title="ResNet-20 block convs, plain decompositions, 50 % kept", xlim=(0, 1), ylim=(0, 1))
ax.legend()
plt.tight_layout()

# %% [markdown]
# The two errors are not the same quantity. The output error is usually *smaller* than the weight
# error (the discarded directions are partly ones the data rarely visit) but not uniformly so, and
# layers with similar weight errors spread widely in output error. A decomposition that looks at
# weights only cannot know which of its errors matter. The fix is to minimise the output error
# directly.

# %% [markdown]
# ## What Σ looks like for a real layer
#
# `weighted.whitening` eigendecomposes $\Sigma = Q\Lambda Q^\top$ and floors the eigenvalues at
# $10^{-10}\lambda_{\max}$ (a ReLU network has dead input channels, so $\Sigma$ can be singular).
# The *effective rank* $\exp(-\sum_i p_i\log p_i)$, $p_i = \lambda_i/\sum_j\lambda_j$, counts how
# many directions carry the data's energy.

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for n in ["layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv2"]:
    wh = weighted.whitening(stats20[n].sigma)
    ax.semilogy(torch.arange(1, len(wh.eigenvalues) + 1) / len(wh.eigenvalues),
                (wh.eigenvalues / wh.eigenvalues[0]).clamp(min=1e-12),
                label=f"{n} (d = {len(wh.eigenvalues)}, eff. rank {wh.effective_rank:.0f})")
    print(f"{n}: d = {len(wh.eigenvalues)}, condition λmax/λmin = {wh.raw_condition:.3g}, "
          f"effective rank {wh.effective_rank:.1f}, eigenvalues above the floor {wh.numerical_rank}")
ax.set(xlabel="eigenvalue index / d", ylabel="λ / λ_max",
       title="Spectrum of Σ = E[x xᵀ] (ResNet-20, 256 calibration images)")
ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# The spectra fall by several orders of magnitude and the effective rank is a small fraction of
# $d$: the inputs of a layer live close to a low-dimensional subspace. That is exactly the
# freedom the Σ-norm exploits — an error orthogonal to that subspace costs almost nothing.
#
# ## The matrix case in closed form
#
# For a matrix (a linear layer, or a conv in the channel-SVD form $W \in \mathbb R^{T\times d}$)
# write $\Sigma = LL^\top$. Then $\|(W-\widetilde W)\Sigma^{1/2}\|_F = \|(W-\widetilde W)L\|_F =
# \|WL - \widetilde W L\|_F$, and $\widetilde W L$ ranges over all rank-$r$ matrices when
# $\widetilde W$ does ($L$ invertible). By Eckart–Young {cite}`eckart1936approximation` the best
# is the truncated SVD of $WL$:
#
# $$ \widetilde W = [\,W L\,]_r\, L^{-1}. $$
#
# By hand for one layer, with a Cholesky factor and a triangular solve (no explicit inverse), then
# against `weighted.weighted_svd` (which uses the eigenvector square root and returns the two
# factors $A = U_r$, $B = U_r^\top W$ of a `ChannelSVDConv2d`):

# %%
Sigma = stats20[name].sigma                                   # float64 [d, d]
W2 = W.double().reshape(W.shape[0], -1)                       # [T, d] = [32, 288]
r = plan_s[name]["rank"]
floor = 1e-10 * torch.linalg.eigvalsh(Sigma)[-1]
L = torch.linalg.cholesky(Sigma + floor * torch.eye(len(Sigma), dtype=Sigma.dtype))
U, s_, Vh = torch.linalg.svd(W2 @ L, full_matrices=False)
WL_r = U[:, :r] @ torch.diag(s_[:r]) @ Vh[:r]                 # [W L]_r
W_sigma = torch.linalg.solve_triangular(L, WL_r, upper=False, left=False)   # [W L]_r L⁻¹

A, B = weighted.weighted_svd(W2, Sigma, r)
print("rank", r, "| max |by hand − lowrank| =", f"{(W_sigma - A @ B).abs().max():.2e}")
assert torch.allclose(W_sigma, A @ B, atol=1e-6 * W2.abs().max())

U0, s0, Vh0 = torch.linalg.svd(W2, full_matrices=False)
W_plain = U0[:, :r] @ torch.diag(s0[:r]) @ Vh0[:r]
for label, Wt in [("plain SVD", W_plain), ("Σ-weighted SVD", W_sigma)]:
    print(f"{label:15s} weight error {relative_error(W2, Wt):.3f}   "
          f"output (Σ) error {weighted.weighted_error(W2, Wt, Sigma):.3f}")
assert weighted.weighted_error(W2, W_sigma, Sigma) < weighted.weighted_error(W2, W_plain, Sigma)
assert relative_error(W2, W_sigma) > relative_error(W2, W_plain)

# %% [markdown]
# Each is best in its own norm: plain SVD has the smaller weight error, the Σ-weighted SVD the
# smaller output error — the one the network feels.
#
# **Tucker-2 and CP.** For $\widetilde W = G\times_1 U_T\times_2 U_S$ there is no closed form,
# because $\Sigma$ couples input channels with kernel positions. `weighted.weighted_tucker2`
# alternates two exact block minimisations (its docstring has the derivation): given $U_S$, the
# pair $(U_T, G)$ comes from a weighted least-squares fit followed by an SVD, the classic
# $U_T = W\Sigma M(M^\top\Sigma M)^{-1}$ step of the authors' "Tucker_Sigma"; given $(U_T, G)$,
# $U_S$ solves a linear system with $S\cdot r_S$ unknowns (a dense solve, at most 1,024 unknowns
# for a 64-channel layer). It starts from HOSVD and never increases the error. On whole networks we run 3 sweeps:
# the Σ-error of a layer typically falls by 20–50 % in the first sweep and changes little after
# the third.

# %%
wh = weighted.whitening(Sigma)
core, U_T, U_S, history = weighted.weighted_tucker2(W, wh, tuple(plan_t[name]["rank"]), n_iter=8)
print(name, "ranks", plan_t[name]["rank"], "| relative Σ-error per sweep:",
      " ".join(f"{h:.4f}" for h in history))
assert all(b <= a + 1e-12 for a, b in zip(history, history[1:]))
assert history[-1] < 0.9 * history[0]

# %% [markdown]
# ## Compressing whole networks, without fine-tuning
#
# `lr.plan(..., norm="data")` marks a plan as data-informed; `lr.compress(model, plan,
# stats=stats)` then factorizes each layer with the Σ-weighted algorithm of its method. Same ranks,
# same parameter count as the plain plan — only the factors differ. We compress the block convs
# (the stem `conv1` and the classifier stay dense) to keep 30 %, 50 % and 70 % of their
# parameters, with channel SVD and Tucker-2, plain and Σ-weighted, and measure accuracy on the
# 1,017 test images with **no fine-tuning at all**. (ResNet-56's Tucker-2 ALS is run at 50 % only,
# to keep the chapter's runtime in budget.)

# %%
LEVELS = [0.3, 0.5, 0.7]
METHODS = {"svd": "channel SVD", "tucker2": "Tucker-2"}
ALS = dict(n_iter=3)


def compress(model, method, level, norm, stats):
    """The compressed model and its plan (plain: Frobenius norm; data: Σ-weighted)."""
    plan = lr.plan(model, method, level, exclude=["conv1", "linear"], norm=norm)
    if norm == "data":
        return lr.compress(model, plan, stats=stats, progress=False, **ALS), plan
    return lr.compress(model, plan, progress=False), plan


def sweep(model, stats, levels):
    """levels: {method: [share of block-conv parameters kept, ...]}."""
    rows = []
    for method in METHODS:
        for level in levels[method]:
            for norm in ["frobenius", "data"]:
                small, plan = compress(model, method, level, norm, stats)
                rows.append(dict(method=method, level=level, norm=norm, params=plan.params,
                                 accuracy=lr.measure.accuracy(small, test), model=small))
    return rows


t = time.time()
rows20 = sweep(resnet20, stats20, {"svd": LEVELS, "tucker2": LEVELS})
print(f"ResNet-20: {len(rows20)} compressed models in {time.time() - t:.0f} s")
t = time.time()
rows56 = sweep(resnet56, stats56, {"svd": LEVELS, "tucker2": [0.5]})
print(f"ResNet-56: {len(rows56)} compressed models in {time.time() - t:.0f} s")


def table(rows, dense):
    print(f"{'method':12s} {'kept':>5s} {'params':>8s} {'plain':>8s} {'Σ-weighted':>11s}   (dense {100 * dense:.2f} %)")
    for p, q in zip(rows[::2], rows[1::2]):
        print(f"{METHODS[p['method']]:12s} {p['level']:5.0%} {p['params']:8,d} "
              f"{100 * p['accuracy']:7.2f}% {100 * q['accuracy']:10.2f}%")


print("ResNet-20"); table(rows20, dense20)
print("ResNet-56"); table(rows56, dense56)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for ax, rows, dense, title in [(axes[0], rows20, dense20, "ResNet-20"),
                               (axes[1], rows56, dense56, "ResNet-56")]:
    for method, color in zip(METHODS, ["C0", "C1"]):
        for norm, style in [("frobenius", "--o"), ("data", "-s")]:
            sel = [r for r in rows if r["method"] == method and r["norm"] == norm]
            ax.plot([r["params"] / 1e3 for r in sel], [100 * r["accuracy"] for r in sel], style,
                    color=color, label=f"{METHODS[method]}, {'Σ-weighted' if norm == 'data' else 'plain'}")
    ax.axhline(100 * dense, color="k", lw=1, label=f"dense ({100 * dense:.1f} %)")
    ax.set(title=f"{title}: no fine-tuning, 1,017 test images", xlabel="parameters of the model (thousands)")
axes[0].set_ylabel("top-1 accuracy (%)")
axes[1].legend(fontsize=8, loc="lower right")
plt.tight_layout()
plt.savefig("/tmp/06_sweep.png", dpi=80)


# %%
def find(rows, method, level, norm):
    return next(r for r in rows if r["method"] == method and r["level"] == level and r["norm"] == norm)


t20, p20 = find(rows20, "tucker2", 0.5, "data"), find(rows20, "tucker2", 0.5, "frobenius")
t56, p56 = find(rows56, "tucker2", 0.5, "data"), find(rows56, "tucker2", 0.5, "frobenius")
print(f"Tucker-2, 50 % kept — ResNet-20: plain {100 * p20['accuracy']:.1f} %, Σ {100 * t20['accuracy']:.1f} %"
      f" | ResNet-56: plain {100 * p56['accuracy']:.1f} %, Σ {100 * t56['accuracy']:.1f} %")
for rows in (rows20, rows56):
    for p, q in zip(rows[::2], rows[1::2]):
        assert q["accuracy"] > p["accuracy"], (p["method"], p["level"])   # Σ always wins
assert t20["accuracy"] >= 0.78 and t56["accuracy"] >= 0.85
assert p20["accuracy"] <= 0.40 and p56["accuracy"] <= 0.60

# %% [markdown]
# At equal ranks and equal parameter counts the Σ-weighted factors are far better than the plain
# ones at every level: plain decompositions of the block convs without fine-tuning collapse at 50 %
# (ResNet-20's plain Tucker-2 falls to roughly a quarter of the images right, channel SVD lower
# still), while the Σ-weighted Tucker-2 keeps ResNet-20 around 80 %. That is the paper's central
# claim, reproduced. It falls short of the stronger targets we set for it (85 % for ResNet-20 at
# 50 %): the remaining loss is the accumulation of per-layer errors, each layer being fitted to
# the inputs of the *dense* network rather than to those of its already compressed predecessors.
#
# ## A short fine-tuning
#
# Fine-tuning repairs much of what a plain decomposition breaks, so the fair question is what is
# left of the advantage afterwards. One epoch over 2,048 augmented training images, with the dense
# model as teacher (knowledge distillation {cite}`hinton2015distilling`), for both Tucker-2
# models at 50 %:

# %%
augmented = lr.data.cifar10("train", limit=2048, augment=True)
tuned = {}
for label, row in [("plain", p20), ("Σ-weighted", t20)]:
    student = copy.deepcopy(row["model"])
    lowrank.train.fit(student, augmented, epochs=1, lr=0.005, teacher=resnet20, progress=False)
    tuned[label] = lr.measure.accuracy(student, test)
    print(f"Tucker-2 50 %, {label:10s}: before {100 * row['accuracy']:.2f} %, after one epoch {100 * tuned[label]:.2f} %"
          f"   (dense {100 * dense20:.2f} %)")
assert tuned["Σ-weighted"] > tuned["plain"]

# %% [markdown]
# How much of the gap one short epoch closes is in the two lines above; the Σ-weighted model
# starts from a far better point, and the assert checks that it is still ahead afterwards.
#
# ## Whose data? Transferring Σ, and how much of it
#
# The statistics need inputs, not labels — but they need *some* inputs. The paper's second claim
# is that $\Sigma$ estimated on a different data set still works. Our offline data include 1,000
# ImageNet images (`lr.data.imagenet_sample(32)`, resized to 32 × 32 and normalised with ImageNet's
# own statistics, as a user without CIFAR would do). As a **control** — not a result — we also
# calibrate on Gaussian noise images: if noise worked as well, the data would not matter.

# %%
imagenet = lr.data.imagenet_sample(32)
noise = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
sources = {"CIFAR-10 train (256)": stats20,
           "ImageNet sample (256)": lr.calibrate(resnet20, imagenet, limit=256, progress=False),
           "noise, control (256)": lr.calibrate(resnet20, noise, limit=256, progress=False)}
transfer = {}
for label, st in sources.items():
    small = t20["model"] if st is stats20 else compress(resnet20, "tucker2", 0.5, "data", st)[0]
    transfer[label] = lr.measure.accuracy(small, test)
    print(f"ResNet-20, Tucker-2 50 %, Σ from {label:22s}: {100 * transfer[label]:.2f} %")

# %%
cifar_acc, imnet_acc = transfer["CIFAR-10 train (256)"], transfer["ImageNet sample (256)"]
assert imnet_acc >= cifar_acc - 0.05
assert imnet_acc > p20["accuracy"] + 0.3

# %% [markdown]
# Σ from 256 ImageNet images, never seen by the network in training and resized to 32 × 32, works
# nearly as well as Σ from CIFAR-10 itself: what matters is the second-order structure of natural
# images (smooth, correlated patches), which both data sets share. The noise control tells
# whether that structure is what matters: compare its row with the two real-image rows.
#
# How many calibration images are enough? ResNet-20, Tucker-2 at 50 %, $\Sigma$ from the first $n$
# CIFAR-10 training images. Each image gives 1,024 input patches to the first stage's layers and
# 64 to the last stage's, so the last stage sees $d = 576$-dimensional patches with only a few
# thousand samples when $n$ is small.

# %%
COUNTS = [16, 256, 1024]
by_count = {}
for n in COUNTS:
    st = stats20 if n == 256 else lr.calibrate(resnet20, train, limit=n, progress=False)
    small = t20["model"] if n == 256 else compress(resnet20, "tucker2", 0.5, "data", st)[0]
    by_count[n] = lr.measure.accuracy(small, test)
    print(f"{n:5d} calibration images: {100 * by_count[n]:.2f} %")

fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.semilogx(COUNTS, [100 * by_count[n] for n in COUNTS], "-o", label="Σ-weighted Tucker-2, 50 %")
ax.axhline(100 * p20["accuracy"], color="C3", ls="--", label="plain Tucker-2, 50 %")
ax.axhline(100 * dense20, color="k", lw=1, label="dense")
ax.set(xlabel="calibration images (CIFAR-10 train)", ylabel="top-1 accuracy (%)",
       title="ResNet-20: how much data does Σ need?")
ax.legend(fontsize=8)
plt.tight_layout()
assert by_count[256] > by_count[16]

# %% [markdown]
# A few hundred images are enough for ResNet-20: below that the last stage's 576-dimensional Σ is
# estimated from too few patches and its small eigenvalues are noise.
#
# ## Explore: compression level × norm
#
# The widget shows, for ResNet-20 with Tucker-2 at the chosen level and norm, the relative output
# error of every block conv (on the calibration statistics) and the resulting accuracy. All
# models were compressed above; moving the slider only draws.

# %%
layer_names = lr.plan(resnet20, "tucker2", 0.5, exclude=["conv1", "linear"]).compressed()
output_error = {}
for r_ in rows20:
    if r_["method"] == "tucker2":
        layers = dict(r_["model"].named_modules())
        output_error[r_["level"], r_["norm"]] = [
            weighted.weighted_error(modules20[n].weight, layers[n].weight.detach(), stats20[n].sigma)
            for n in layer_names]


def show(level=0.5, norm="data"):
    row = find(rows20, "tucker2", level, norm)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(range(len(layer_names)), output_error[level, norm], color="C1" if norm == "data" else "C0")
    ax.set_xticks(range(len(layer_names)), [n.replace("layer", "l").replace(".conv", ".c") for n in layer_names],
                  rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="relative output error",
           title=f"Tucker-2, {level:.0%} kept, {'Σ-weighted' if norm == 'data' else 'plain'}: "
                 f"accuracy {100 * row['accuracy']:.1f} % (dense {100 * dense20:.1f} %)")
    plt.tight_layout()
    plt.show()


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

widgets.interact(show, level=widgets.SelectionSlider(options=LEVELS, value=0.5, description="kept"),
                 norm=widgets.ToggleButtons(options=[("plain", "frobenius"), ("Σ-weighted", "data")],
                                            value="data", description="norm"));

# %% [markdown]
# The static twin of the widget: the per-layer output error of both norms at every level.

# %%
fig, axes = plt.subplots(1, len(LEVELS), figsize=(14, 3.8), sharey=True)
for ax, level in zip(axes, LEVELS):
    for k, (norm, label) in enumerate([("frobenius", "plain"), ("data", "Σ-weighted")]):
        acc = find(rows20, "tucker2", level, norm)["accuracy"]
        ax.bar([i + 0.4 * k for i in range(len(layer_names))], output_error[level, norm], width=0.4,
               label=f"{label} ({100 * acc:.1f} %)")
    ax.set(title=f"ResNet-20 Tucker-2, {level:.0%} kept", xlabel="block conv (network order)")
    ax.legend(fontsize=8, title=f"accuracy (dense {100 * dense20:.1f} %)", title_fontsize=8)
axes[0].set_ylabel("relative output error ‖EΣ½‖/‖WΣ½‖")
plt.tight_layout()

# %% [markdown]
# ## Summary
#
# - The error a network feels is $\|(W-\widetilde W)\Sigma^{1/2}\|_F$, $\Sigma$ the second moment
#   of the layer's inputs — an identity checked here on real activations to machine precision.
# - For a matrix the minimiser is $[WL]_r L^{-1}$; Tucker-2 (and CP) need alternating least squares
#   in which $\Sigma$ couples channels and kernel positions.
# - At equal parameter counts and without fine-tuning, Σ-weighted channel SVD and Tucker-2 keep
#   pretrained ResNets usable where plain decompositions collapse; Σ from another image data set
#   transfers with a small drop.
#
# ## Exercises
#
# 1. Prove the closed form: for $\Sigma = LL^\top$ with $L$ invertible, $\widetilde W = [WL]_r
#    L^{-1}$ minimises $\|(W-\widetilde W)\Sigma^{1/2}\|_F$ over matrices of rank at most $r$.
#    Show also that $\widetilde W = U_rU_r^\top W$, $U_r$ the leading left singular vectors of $WL$.
# 2. What does $\Sigma = I$ give back? And $\Sigma = c\,I$? What about a $\Sigma$ that is the
#    identity on the channels but not on the kernel positions, $\Sigma = I_S \otimes K$?
# 3. A layer has a dead input channel (always zero after the ReLU). What happens to $\Sigma$,
#    to the closed form, and to the weights of that channel in $\widetilde W$? Why does the package
#    floor the eigenvalues instead of failing?
# 4. The control with noise images gave a much worse Σ than ImageNet. Explain with the spectrum
#    of $\Sigma$ of the first layer which directions noise over-weights.
#
# :::{dropdown} Solutions
# 1. $\|(W-\widetilde W)\Sigma^{1/2}\|_F^2 = \operatorname{tr}((W-\widetilde W)LL^\top(W-\widetilde W)^\top)
#    = \|WL - \widetilde WL\|_F^2$. Since $L$ is invertible, $X = \widetilde W L$ has the same rank
#    as $\widetilde W$ and every rank-$r$ $X$ arises from $\widetilde W = XL^{-1}$. So the problem
#    is $\min_{\operatorname{rank}X\le r}\|WL - X\|_F$, solved by Eckart–Young: $X = [WL]_r$. With
#    $WL = U S V^\top$, $[WL]_r = U_rU_r^\top WL$, hence $\widetilde W = U_rU_r^\top W L L^{-1} =
#    U_rU_r^\top W$: a projection of the *original* weights onto the $r$ output directions that
#    matter most for the data — two factors $A = U_r$, $B = U_r^\top W$, no inverse at all.
# 2. $\Sigma = I$: $L = I$ and $\widetilde W = [W]_r$, the plain truncated SVD; Tucker-2 ALS
#    becomes HOOI and CP-ALS the usual one. $\Sigma = cI$ scales the norm, not the minimiser.
#    $\Sigma = I_S\otimes K$ weights kernel positions only: the channel-SVD minimiser is $[W(I\otimes
#    L_K)]_r(I\otimes L_K)^{-1}$, a plain SVD after re-weighting the spatial taps.
# 3. Its rows and columns of $\Sigma$ are zero, so $\Sigma$ is singular and $L^{-1}$ does not
#    exist; any value of $\widetilde W$ on that channel gives the same error (the minimiser is not
#    unique). The form $U_rU_r^\top W$ still exists and keeps that channel's weights projected like
#    the rest. Flooring the eigenvalues at $10^{-10}\lambda_{\max}$ is a tiny ridge that picks, among
#    all minimisers, the one closest to $W$ on unseen directions — a safe choice if the channel ever
#    wakes up on new data.
# 4. White noise has a flat spectrum in the first layer's patch space, while natural images put
#    most of their energy into smooth, low-frequency patches. A Σ from noise therefore asks the
#    decomposition to preserve high-frequency filter responses that real images hardly excite and
#    spends rank on them; deeper layers inherit activations that look nothing like those of images.
# :::

# %%
print(f"chapter ran in {time.time() - start:.0f} s")
