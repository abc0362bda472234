# %% [markdown]
# # CP: a sum of rank-one kernels
#
# Tucker-2 kept a small dense core between two 1×1 convolutions. CP (CANDECOMP/PARAFAC) goes one
# step further and makes the core *diagonal*: the kernel becomes a plain sum of $R$ rank-one
# tensors {cite}`kolda2009tensor`. Lebedev et al. {cite}`lebedev2015cp` turned this into a
# sequence of four cheap convolutions and reported an 8.5× CPU speed-up on a character CNN for one
# point of accuracy. This chapter builds CP by hand, meets its peculiar failure mode
# (*degeneracy*, {cite}`desilva2008ill`) on a real pretrained kernel, and then compresses
# pretrained ResNet-20 {cite}`he2016resnet,idelbayev2018resnet` with it, side by side with
# Tucker-2 at equal parameters — including the part that looks worse than the MAC count promises.

# %%
import copy
import time
import warnings

import ipywidgets as widgets
import matplotlib.pyplot as plt
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import parafac

import lowrank as lr
import lowrank.train  # noqa: F401  (lr.train.fit)
from lowrank.decompose.cp import CPDegeneracyWarning, conv_cp, cp_als, cp_reconstruct
from lowrank.decompose.tucker import unfold

torch.manual_seed(0)
threads = torch.get_num_threads()
torch.set_num_threads(1)   # the tensors of the first sections are tiny: extra threads only cost time
print("data root:", lr.storage.data_root().name, "| torch", torch.__version__.split("+")[0],
      "| threads:", threads)

# %% [markdown]
# ## Rank-one terms
#
# A rank-one 3-way tensor is an outer product $a \circ b \circ c$ with entries $a_i b_j c_k$. A
# rank-$R$ CP decomposition writes a tensor as a weighted sum of $R$ of them,
#
# $$ X \approx \sum_{q=1}^{R} \lambda_q\, a_q \circ b_q \circ c_q, \qquad
#    A = [a_1 \dots a_R] \in \mathbb{R}^{I\times R},\; B \in \mathbb{R}^{J\times R},\; C \in \mathbb{R}^{K\times R}. $$
#
# Unlike the matrix case there is no SVD that hands us the best rank-$R$ terms: they have to be
# found by optimisation. The standard solver is **alternating least squares** (ALS): with $B$ and
# $C$ fixed, the best $A$ is an ordinary least-squares problem, because the mode-0 unfolding is
# linear in $A$:
#
# $$ X_{(0)} \approx A\, (B \odot C)^\top, \qquad
#    A \leftarrow X_{(0)} (B \odot C)\, \big(B^\top B * C^\top C\big)^{-1}, $$
#
# where $\odot$ is the Khatri–Rao (column-wise Kronecker) product and $*$ the entrywise product.
# Then the same for $B$, then $C$, and around again. Here it is for a tensor of any order, in a
# few lines, on a small synthetic tensor of known rank 3 plus a little noise.

# %%
def khatri_rao(A, B):
    """Column-wise Kronecker product: [I, R], [J, R] -> [I·J, R], row i·J + j."""
    return (A[:, None, :] * B[None, :, :]).reshape(-1, A.shape[1])


def als(X, R, iters=200, seed=0):
    """Plain CP-ALS from random factors; returns the factors [I_n, R] (λ folded in)."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(n, R, generator=g, dtype=X.dtype) for n in X.shape]
    for _ in range(iters):
        for n in range(X.dim()):
            others = [A[k] for k in range(X.dim()) if k != n]
            K, V = others[0], others[0].T @ others[0]
            for B in others[1:]:
                K, V = khatri_rao(K, B), V * (B.T @ B)
            A[n] = torch.linalg.solve(V, (unfold(X, n) @ K).T).T      # least squares for mode n
    return A


g = torch.Generator().manual_seed(1)
true = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 4)]
X = cp_reconstruct(torch.ones(3, dtype=torch.float64), true)
X = X + 0.01 * X.norm() / X.numel() ** 0.5 * torch.randn(X.shape, generator=g, dtype=torch.float64)

A = als(X, 3, iters=1000)
ours = torch.einsum("ir,jr,kr->ijk", *A)
mine_err = float((X - ours).norm() / X.norm())
result = cp_als(X, 3)                      # defaults: SVD start, ridge, line search
result0 = cp_als(X, 3, ridge=0, tol=1e-12)   # no ridge, run to convergence
tl.set_backend("pytorch")
tl_cp = parafac(X, 3, init="svd", n_iter_max=1000, tol=1e-10)
tl_err = float((X - tl.cp_to_tensor(tl_cp)).norm() / X.norm())
print(f"relative error  from scratch (1000 sweeps): {mine_err:.6f}")
print(f"                lr cp_als: {result.relative_error:.6f} ({result.n_iter} sweeps), "
      f"ridge=0, tol=1e-12: {result0.relative_error:.6f} ({result0.n_iter} sweeps)")
print(f"                tensorly parafac: {tl_err:.6f}")
assert torch.allclose(result.reconstruct(), torch.einsum("r,ir,jr,kr->ijk", result.weights, *result.factors))
assert abs(mine_err - result0.relative_error) < 1e-5
assert result0.relative_error <= tl_err + 1e-6
assert result.relative_error <= 1.01 * tl_err

# %% [markdown]
# All of them reach the noise floor (the noise was about 1 % of the norm; the best rank-3 fit
# removes part of it). Run to convergence without the ridge, `cp_als` lands on the same error as
# our loop and as TensorLy. With its defaults it stops earlier (the error changed by less than
# `tol` = 1e-6 between sweeps) a fraction of a percent above the optimum: cheap, and for network
# weights more than good enough. Plain ALS from a random start needed many sweeps here: with 200 sweeps one of four
# random starts was still stuck at 3 % error, a first taste of ALS's slow "swamps".
#
# `lr.decompose.cp.cp_als` does the same sweeps with three additions that matter later: it starts from the leading singular vectors of
# each unfolding (*SVD initialisation*), keeps every factor column at unit norm and moves the
# scale into the weights $\lambda_q$ (*normalisation*), and adds a small *ridge* $\varepsilon I$
# to each $B^\top B * C^\top C$ before solving. It also extrapolates along the last step (a line
# search) and stops when the error changes by less than `tol`. {cite}`kossaifi2019tensorly`'s
# `parafac` is the reference implementation we check against.
#
# ## Degeneracy on a real kernel
#
# The matrix low-rank problem always has a best solution. The CP problem often does not: the set
# of tensors of rank $\le R$ is not closed, so a sequence of rank-$R$ tensors can approach a
# tensor of higher rank, with the error going down ever more slowly while the individual terms
# grow without bound and cancel each other {cite}`desilva2008ill`. ALS then "converges" to huge,
# nearly opposite components. This is not a curiosity of contrived examples: here is the first
# convolution of ResNet-20's first block, a real pretrained kernel of shape $16\times16\times3\times3$,
# at rank 8, with the plain ALS written above (random start, no normalisation, no ridge). We track
# the error and the size $\|a_q\|\|b_q\|\|c_q\|\|d_q\|$ of every term.

# %%
resnet20 = lr.models.resnet20()
test = lr.data.cifar10("test", limit=1017)
W = resnet20.get_submodule("layer1.0.conv1").weight.detach().double()   # [16, 16, 3, 3]


def track(X, R, iters, seed=0, every=10):
    """Plain ALS, recording (relative error, term norms / ‖X‖, factors) every ``every`` sweeps."""
    log = []
    A = als(X, R, iters=0, seed=seed)  # random start
    for it in range(iters // every):
        A = als_continue(X, A, every)
        Xh = cp_reconstruct(torch.ones(R, dtype=X.dtype), A)
        norms = torch.stack([a.norm(dim=0) for a in A]).prod(0) / X.norm()
        log.append((float((X - Xh).norm() / X.norm()), norms))
    return log, A


def als_continue(X, A, iters):
    """``iters`` more plain ALS sweeps from factors ``A``."""
    A = list(A)
    for _ in range(iters):
        for n in range(X.dim()):
            others = [A[k] for k in range(X.dim()) if k != n]
            K, V = others[0], others[0].T @ others[0]
            for B in others[1:]:
                K, V = khatri_rao(K, B), V * (B.T @ B)
            A[n] = torch.linalg.solve(V, (unfold(X, n) @ K).T).T
    return A


def congruence(A):
    """[R, R] cosines between the rank-one terms (product of the column cosines of each factor)."""
    U = [a / a.norm(dim=0) for a in A]
    C = torch.ones(A[0].shape[1], A[0].shape[1], dtype=A[0].dtype)
    for u in U:
        C = C * (u.T @ u)
    return C.fill_diagonal_(0)


start = time.perf_counter()
log, A_plain = track(W, 8, 1500, seed=1)
errors = [e for e, _ in log]
norms = torch.stack([n for _, n in log])                      # [checkpoints, R]
C = congruence(A_plain)
p, q = divmod(int(C.argmin()), 8)
print(f"{time.perf_counter() - start:.1f} s | relative error after 10 sweeps {errors[0]:.4f}, "
      f"after 100: {errors[9]:.4f}, after 1500: {errors[-1]:.4f}")
print(f"sum of term sizes / ‖W‖ after 100 sweeps: {float(norms[9].sum()):.1f}, "
      f"after 1500: {float(norms[-1].sum()):.1f}; "
      f"terms {p} and {q} have congruence {float(C[p, q]):.3f}")

# %%
sweeps = [10 * (i + 1) for i in range(len(log))]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.plot(sweeps, errors)
ax1.set(xlabel="ALS sweep", ylabel="relative error ‖W − Ŵ‖ / ‖W‖",
        title="Fit: stalls while the terms keep moving")
for r in range(8):
    style = dict(lw=2.2) if r in (p, q) else dict(lw=0.8, color="grey", alpha=0.6)
    ax2.plot(sweeps, norms[:, r], label=f"term {r} (opposite pair)" if r in (p, q) else None, **style)
ax2.plot(sweeps, norms.sum(1), "k--", label="sum of all terms")
ax2.set(xlabel="ALS sweep", ylabel="size of term / ‖W‖", yscale="log",
        title="Term sizes: two grow and cancel")
ax2.legend(fontsize=8)
fig.suptitle("Plain CP-ALS, rank 8, of ResNet-20 layer1.0.conv1 (real pretrained kernel 16×16×3×3)")
plt.tight_layout()

k = 9                                                          # sweep 100
assert errors[-1] <= errors[k] + 1e-9                          # the fit never gets worse ...
assert errors[k] - errors[-1] < 0.005                          # ... but barely improves after sweep 100
assert float(norms[-1].sum()) > 2 * float(norms[k].sum())      # while the terms keep growing
assert float(C[p, q]) < -0.9                                   # two nearly opposite terms

# %% [markdown]
# Over 1,500 sweeps the error moves in the third decimal while the sum of the terms' sizes keeps
# climbing: a pair of terms grows and points in nearly opposite directions (their congruence, the
# cosine between the two rank-one tensors, approaches −1), so most of what they contribute cancels.
# Such factors are useless in a network: the two branches of the CP layer would carry large,
# opposite activations and fine-tuning would start from an ill-conditioned point.
#
# What the safeguards of `cp_als` do on the same kernel and rank:

# %%
def run(**options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = cp_als(W, 8, **options)
    warned = any(issubclass(w.category, CPDegeneracyWarning) for w in caught)
    worst = float(congruence([f * (r.weights if i == 0 else 1) for i, f in enumerate(r.factors)]).min())
    return r, warned, worst


rows = {"plain ALS above (random start)": None,
        "cp_als, ridge=0, no line search": dict(ridge=0, line_search=False),
        "cp_als, ridge=0": dict(ridge=0),
        "cp_als defaults (SVD init, ridge 1e-3)": {}}
print(f"{'':42s} {'error':>7s} {'sweeps':>6s} {'Σ|λ|/‖W‖':>9s} {'worst pair':>10s} warning")
print(f"{'plain ALS above (random start)':42s} {errors[-1]:7.4f} {1500:6d} {float(norms[-1].sum()):9.1f} "
      f"{float(C[p, q]):10.3f}")
safe = {}
for name, options in list(rows.items())[1:]:
    r, warned, worst = run(**options)
    safe[name] = (r, warned, worst)
    print(f"{name:42s} {r.relative_error:7.4f} {r.n_iter:6d} "
          f"{float(r.weights.abs().sum() / W.norm()):9.1f} {worst:10.3f} {warned}")
r_default, warned_default, _ = safe["cp_als defaults (SVD init, ridge 1e-3)"]
assert not warned_default and safe["cp_als, ridge=0"][1]
assert float(r_default.weights.abs().sum() / W.norm()) < 0.5 * float(norms[-1].sum())
assert r_default.relative_error < errors[-1] + 0.01

# %% [markdown]
# - Without the ridge, `cp_als` drifts into the same degenerate valley and says so with a
#   `CPDegeneracyWarning` (it flags a pair of terms with congruence below −0.9, or weights whose
#   total is far above $\sqrt{R}\,\|W\|$).
# - The ridge $\varepsilon\|\lambda\|^2$-like penalty makes large cancelling terms expensive:
#   the defaults stop at an error within a fraction of a point of the degenerate solution, with
#   weights of ordinary size. That is the trade the book takes: a hair of fit for factors a
#   network can use.
# - The SVD start makes the result deterministic and usually closer to a good solution; the
#   normalisation keeps the scale in $\lambda$, where the degeneracy check can see it.
#
# ## The CP layer
#
# A 4-way CP of a conv kernel $W \in \mathbb{R}^{T\times S\times k_h\times k_w}$,
# $W_{tsij} \approx \sum_q \lambda_q\, A^T_{tq} A^S_{sq} A^h_{iq} A^w_{jq}$, is a chain of four
# convolutions {cite}`lebedev2015cp`:
#
# 1. a 1×1 conv $S\to R$ (weights $A^S$): project onto $R$ input combinations;
# 2. a *depthwise* $k_h\times1$ conv (one filter $A^h_{:q}$ per channel, $R$ groups), with the
#    original vertical stride and padding;
# 3. a depthwise $1\times k_w$ conv ($A^w_{:q}$), the horizontal stride and padding;
# 4. a 1×1 conv $R\to T$ (weights $\lambda_q A^T_{tq}$) with the original bias.
#
# Parameters: $R(S + k_h + k_w + T)$. The 3-way form merges the kernel positions
# ($T\times S\times k_hk_w$) and uses one depthwise $k_h\times k_w$ conv: $R(S + k_hk_w + T)$,
# slightly more parameters per rank but a more flexible spatial filter per term. First the
# exactness check: a layer built from known CP factors must reproduce the dense conv with the
# reconstructed kernel, including stride and padding.

# %%
conv = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1).double()
g = torch.Generator().manual_seed(2)
factors = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (64, 32, 3, 3)]
weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
with torch.no_grad():
    conv.weight.copy_(cp_reconstruct(weights, factors))
x = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64)
cp4 = lr.layers.CPConv2d.from_factors(conv, weights, factors, form="4way")
merged = [factors[0], factors[1], khatri_rao(factors[2], factors[3])]          # [kh·kw, R]
cp3 = lr.layers.CPConv2d.from_factors(conv, weights, merged, form="3way")
print(cp4)
for layer in (cp4, cp3):
    assert torch.allclose(layer(x), conv(x), atol=1e-10)
print("4-way and 3-way CP layers reproduce the dense conv exactly (float64).")

# %% [markdown]
# Now the parameter count, checked three ways for every block conv of ResNet-20 at rank 8:
# the formula, the plan, and the modules the plan builds.

# %%
# NBVAL_CHECK_OUTPUT
R = 8
for method, form in (("cp", "4way"), ("cp3", "3way")):
    plan = lr.plan(resnet20, method=method, ranks=R, exclude=["conv1", "linear"])
    total = 0
    for name, entry in plan.items():
        T, S, kh, kw = resnet20.get_submodule(name).weight.shape
        formula = R * (S + kh + kw + T) if form == "4way" else R * (S + kh * kw + T)
        formula += T                                                           # bias of the last 1×1
        assert entry["params"][1] == formula - (resnet20.get_submodule(name).bias is None) * T
        total += entry["params"][1]
    example = plan["layer3.0.conv2"]
    print(f"{method:4s} rank {R}: layer3.0.conv2 {example['params'][0]:,} -> {example['params'][1]:,} "
          f"parameters; all 18 block convs {total:,}")

# %% [markdown]
# (ResNet's convolutions carry no bias; the batch norm after them does that job.) For a
# $64\times64\times3\times3$ layer one rank costs 134 parameters in 4-way form against 137 in
# 3-way form and 36,864 for the dense kernel.
#
# ## How good is CP on a real kernel?
#
# The relative error of the CP fit against the rank, for one real kernel in both forms, next to
# Tucker-2 at the same number of parameters (ranks $r_T=r_S=r$, parameters $r(S+T)+r^2k_hk_w$).
# This is precomputed once for the widget below.

# %%
name = "layer1.2.conv2"
Wl = resnet20.get_submodule(name).weight.detach().double()           # [16, 16, 3, 3]
T, S, kh, kw = Wl.shape
ranks = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48]
start = time.perf_counter()
curve = {"cp": [], "cp3": []}
for R in ranks:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPDegeneracyWarning)
        curve["cp"].append(conv_cp(Wl, R, form="4way").relative_error)
        curve["cp3"].append(conv_cp(Wl, R, form="3way").relative_error)
params = {"cp": [R * (S + kh + kw + T) for R in ranks], "cp3": [R * (S + kh * kw + T) for R in ranks]}
tucker_params, tucker_err = [], []
for r in range(1, 17):
    core, U_T, U_S = lr.decompose.tucker.hooi(Wl, (r, r))[:3]
    tucker_params.append(r * (S + T) + r * r * kh * kw)
    tucker_err.append(lr.decompose.tucker.relative_error(Wl, lr.decompose.tucker.tucker2_reconstruct(core, U_T, U_S)))
print(f"{time.perf_counter() - start:.1f} s for {2 * len(ranks)} CP fits")
for m in ("cp", "cp3"):
    print(m, " ".join(f"{e:.3f}" for e in curve[m]))
for m in ("cp", "cp3"):
    assert all(b <= a + 1e-3 for a, b in zip(curve[m], curve[m][1:])), m   # error decreases with rank

# %% [markdown]
# The widget: pick a CP rank for this layer and see its error and parameter count against the
# dense kernel ($16\cdot16\cdot9 = 2{,}304$ parameters) and Tucker-2 at the nearest parameter count.

# %%
# NBVAL_IGNORE_OUTPUT
dense_params = Wl.numel()


def show(rank_index=4):
    i = rank_index
    R = ranks[i]
    j = min(range(len(tucker_params)), key=lambda k: abs(tucker_params[k] - params["cp"][i]))
    print(f"CP rank {R}: 4-way error {curve['cp'][i]:.3f} with {params['cp'][i]:,} parameters "
          f"({params['cp'][i] / dense_params:.0%} of dense); 3-way error {curve['cp3'][i]:.3f} "
          f"with {params['cp3'][i]:,}")
    print(f"Tucker-2 rank {j + 1}: error {tucker_err[j]:.3f} with {tucker_params[j]:,} parameters")


widgets.interact(show, rank_index=widgets.SelectionSlider(
    options=[(str(R), i) for i, R in enumerate(ranks)], value=4, description="CP rank"));

# %% [markdown]
# The same curves as a static figure:

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(params["cp"], curve["cp"], "o-", label="CP 4-way")
ax.plot(params["cp3"], curve["cp3"], "s-", label="CP 3-way")
ax.plot(tucker_params, tucker_err, "^-", label="Tucker-2 (r_T = r_S)")
ax.axvline(dense_params, color="grey", ls=":", label="dense kernel")
ax.set(xscale="log", xlabel="parameters of the factorized layer", ylabel="relative error ‖W − Ŵ‖ / ‖W‖",
       title=f"ResNet-20 {name} (16×16×3×3): error vs parameters")
ax.legend()
plt.tight_layout()

# %% [markdown]
# Two things to read off. At few parameters CP fits better than Tucker-2: a rank-$R$ CP spends
# nothing on a core, so for the same budget it affords many more terms. Towards the dense size the
# curves meet, and the 3-way form is slightly better than the 4-way form at equal parameters on this
# layer: a separable $k_h\times1$ then $1\times k_w$ filter is a restriction that a 3×3 kernel does
# not need to obey.
#
# ## Compressing ResNet-20 with CP
#
# Now every block convolution (the stem `conv1` and the classifier stay dense), at two shares of
# each layer's parameters. `ranks=0.3` asks for 30 % of every layer's parameters; the plan turns
# it into a CP rank per layer. Without fine-tuning first. The CP-ALS of all 18 layers is the
# costly step; we time it.

# %%
torch.set_num_threads(threads)       # back to all threads for whole networks
base = lr.measure.accuracy(resnet20, test)
print("dense ResNet-20:", base)
shares = [0.15, 0.3]
results = {}
for method in ("cp", "cp3", "tucker2"):
    for share in shares:
        plan = lr.plan(resnet20, method=method, ranks=share, exclude=["conv1", "linear"])
        start = time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CPDegeneracyWarning)
            small = lr.compress(resnet20, plan, progress=False)
        seconds = time.process_time() - start
        flagged = sum(issubclass(w.category, CPDegeneracyWarning) for w in caught)
        acc = lr.measure.accuracy(small, test)
        results[method, share] = dict(model=small, plan=plan, acc=acc, seconds=seconds, warned=flagged)
        print(f"{method:8s} share {share:.2f}: params {lr.measure.params(small):7,} "
              f"MACs {lr.measure.macs(small) / 1e6:5.1f} M  accuracy {acc}  "
              f"(decomposition {seconds:4.1f} s CPU, {flagged} degeneracy warnings)")

# %% [markdown]
# Without fine-tuning, low-rank ResNet-20 is fragile: every layer's error compounds through 18
# layers. Accuracies are paired on the same 1,017 images (standard error about 0.9 points).
#
# ## A short fine-tuning
#
# Lebedev et al. fine-tune after the decomposition, and so do we: two epochs over the 5,085
# offline training images, with the dense model as teacher (distillation
# {cite}`hinton2015distilling`). We do it for CP and Tucker-2 at the same 30 % share.

# %%
train = lr.data.cifar10("train", limit=5085, augment=True)
tuned = {}
for method in ("cp", "tucker2"):
    model = copy.deepcopy(results[method, 0.3]["model"])
    start = time.perf_counter()
    lr.train.fit(model, train, epochs=2, teacher=resnet20, progress=False)
    tuned[method] = model
    results[method, 0.3]["tuned"] = lr.measure.accuracy(model, test)
    print(f"{method:8s} 30 %: {results[method, 0.3]['acc']} -> {results[method, 0.3]['tuned']} after "
          f"2 epochs ({time.perf_counter() - start:.0f} s); dense {base}")

# %%
gain = {m: float(results[m, 0.3]["tuned"]) - float(results[m, 0.3]["acc"]) for m in ("cp", "tucker2")}
assert gain["cp"] >= 0.05, gain            # fine-tuning recovers at least 5 points for CP at 30 %
assert float(results["cp", 0.3]["tuned"]) >= float(base) - 0.15

# %% [markdown]
# ## Parameters, MACs and measured latency
#
# Equal parameters do not mean equal time. One table, all models on the same images, latency
# measured one after the other in this run at batch size 1 and 32 on this machine's CPU threads.

# %%
models = {"dense": resnet20, "cp 30 % (tuned)": tuned["cp"], "cp3 30 %": results["cp3", 0.3]["model"],
          "tucker2 30 % (tuned)": tuned["tucker2"]}
table = lr.measure.compare(models, test, batch_size=1, latency_time=0.5)
table

# %%
# NBVAL_IGNORE_OUTPUT
batch32 = {name: lr.measure.latency(m, batch_size=32, min_run_time=0.5).seconds * 1e3 for name, m in models.items()}
print("latency at batch 32 (ms):", {k: round(v, 1) for k, v in batch32.items()})
macs = {name: lr.measure.macs(m) for name, m in models.items()}
for name in models:
    print(f"{name:22s} MACs ×{macs['dense'] / macs[name]:.2f}   batch-32 speed-up ×{batch32['dense'] / batch32[name]:.2f}")

# %% [markdown]
# The MAC ratio promises a speed-up that the CPU does not deliver for CP. The reason is the
# depthwise convolutions: each of the $R$ channels has its own $k_h\times1$ (or $1\times k_w$)
# filter, so there is no matrix product for the CPU's fast kernels to work on. Every output value
# needs only 3 multiply–accumulates, but it must be read and written from memory like any other,
# and the extra two layers each add their own pass over the feature map and their own call
# overhead. Dense 3×3 convolutions and the 1×1 convolutions of Tucker-2 are large matrix products
# that run near the machine's peak. Lebedev et al.'s 8.5× CPU speed-up came with hand-written
# code on a network where the separable layers were large; on small CIFAR ResNets with PyTorch's
# stock depthwise kernels, the honest result is that CP saves parameters and MACs but not
# time. A single layer shows it in isolation:

# %%
# NBVAL_IGNORE_OUTPUT
def per_call(module, x, repeat=50):
    with torch.no_grad():
        for _ in range(5):
            module(x)
        start = time.perf_counter()
        for _ in range(repeat):
            module(x)
    return (time.perf_counter() - start) / repeat * 1e3


dense3 = resnet20.get_submodule("layer3.1.conv1")
x = torch.randn(32, 64, 8, 8)
layer_models = {"dense 3×3": dense3,
                "cp (4 convs)": tuned["cp"].get_submodule("layer3.1.conv1"),
                "tucker2 (3 convs)": tuned["tucker2"].get_submodule("layer3.1.conv1")}
for label, module in layer_models.items():
    t = per_call(module.eval(), x)
    m = lr.measure.macs(module, (64, 8, 8))
    print(f"{label:18s} {m / 1e3:7.1f} k MACs   {t:6.3f} ms per batch of 32   "
          f"{m * 32 / (t * 1e-3) / 1e9:5.2f} G MAC/s")

# %% [markdown]
# The throughput column (MACs per second) is what collapses for CP: the work shrinks, the rate
# at which the CPU does it shrinks even more. On a GPU, or with a fused kernel, the picture
# changes; MACs are a property of the model, latency of the model *and* the machine.
#
# ## Exercises
#
# 1. (Synthetic.) Run the plain `als` above at rank 2 on the tensor
#    $a\circ a\circ b + a\circ b\circ a + b\circ a\circ a$ (with $a \perp b$, unit vectors of
#    length 4). It has rank 3, but rank-2 tensors approximate it arbitrarily well. What happens to
#    the error and the term sizes? What does `cp_als` (defaults) return, and does it warn?
# 2. Compress ResNet-20 with `method="cp3"` at 30 % and fine-tune it as above. Is the 3-way form
#    better than the 4-way form after fine-tuning, as its lower weight error suggests?
# 3. Find the parameter share at which CP's MACs equal those of Tucker-2 for `layer3.1.conv1`,
#    and compare their measured latencies there.
#
# :::{dropdown} Solutions
# 1. ```python
#    a, b = torch.eye(4, dtype=torch.float64)[:2]
#    X = (torch.einsum("i,j,k->ijk", a, a, b) + torch.einsum("i,j,k->ijk", a, b, a)
#         + torch.einsum("i,j,k->ijk", b, a, a))
#    A = als(X, 2, iters=2000)
#    print((X - torch.einsum("ir,jr,kr->ijk", *A)).norm() / X.norm(),
#          [a.norm(dim=0) for a in A])
#    r = cp_als(X, 2)
#    ```
#    Plain ALS drives the error towards zero (about 0.5 % after 2,000 sweeps) only by letting the
#    factor norms grow: the tensor has rank 3 but lies on the closure of the rank-2 tensors
#    (de Silva and Lim's classic example {cite}`desilva2008ill`), so no best rank-2
#    approximation exists. Look at `r.weights` and `r.relative_error` of `cp_als`: a solver with
#    safeguards must either stop at bounded weights with a larger error, or warn.
# 2. Replace `"cp"` by `"cp3"` in the fine-tuning cell. The difference is within the
#    ~0.9-point standard error of 1,017 images: weight error is only a rough guide to accuracy.
# 3. Use `lr.plan(resnet20, method=..., ranks=share, include=["layer3.1.conv1"])` and
#    `plan.macs` for a grid of shares; time the layers with `per_call`. CP stays slower at
#    equal MACs on a CPU because of its depthwise layers.
# :::
