"""Layer input statistics for the data-informed decompositions.

A layer ``y = W x`` (a linear layer, or a conv seen as the matrix ``W`` [T, S*kh*kw] acting on
im2col patches) changes its output on real inputs by ``‖(W − W̃) X‖_F`` when ``W`` is replaced
by ``W̃``, where the columns of ``X`` are the layer's input vectors. Only ``Σ = X Xᵀ / n``
enters that error, so :func:`calibrate` runs a calibration set through the model once and keeps,
per layer, ``Σ x xᵀ``, ``Σ x`` and the count ``n`` — never the activations themselves.
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .measure import _as_input, _eval


@dataclass
class LayerStats:
    """Statistics of one layer's input vectors ``x`` [d].

    ``second_moment`` [d, d] float64 is ``E[x xᵀ]``, ``mean`` [d] float64 is ``E[x]`` and
    ``count`` the number of vectors averaged. ``centered`` chooses which matrix :attr:`sigma` is.
    ``fingerprint``: :func:`fingerprint` of the layer's weight when it was calibrated (statistics
    are refused on a layer with other weights), ``None`` if unknown.
    """

    second_moment: torch.Tensor
    mean: torch.Tensor
    count: int
    centered: bool = False
    fingerprint: list | None = None

    @property
    def dim(self) -> int:
        """Length ``d`` of the input vectors (``S*kh*kw`` for a conv, ``in_features`` for a linear)."""
        return self.mean.shape[0]

    @property
    def covariance(self) -> torch.Tensor:
        """``E[(x − μ)(x − μ)ᵀ] = E[x xᵀ] − μ μᵀ`` [d, d] (divided by ``count``, not ``count − 1``)."""
        return self.second_moment - torch.outer(self.mean, self.mean)

    @property
    def sigma(self) -> torch.Tensor:
        """The matrix Σ [d, d] of the weighted norm: the covariance if ``centered``, else the second moment."""
        return self.covariance if self.centered else self.second_moment

    def to_dict(self) -> dict:
        """Plain tensors and numbers, loadable with ``torch.load(..., weights_only=True)``."""
        return {"second_moment": self.second_moment, "mean": self.mean,
                "count": int(self.count), "centered": bool(self.centered), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        """Inverse of :meth:`to_dict`."""
        return cls(d["second_moment"], d["mean"], int(d["count"]), bool(d["centered"]), d.get("fingerprint"))


def fingerprint(weight: torch.Tensor) -> list:
    """``[Σ w, Σ w²]`` of a weight, in float64: enough to tell one layer's weights from another's."""
    w = weight.detach().double()
    return [float(w.sum()), float(w.square().sum())]


def same_weights(fingerprint_: list, weight: torch.Tensor) -> bool:
    """Whether ``weight`` has the :func:`fingerprint` ``fingerprint_`` (up to summation order)."""
    now, scale = fingerprint(weight), 1e-9 * max(fingerprint_[1], 1e-300)
    return (abs(now[1] - fingerprint_[1]) <= scale
            and abs(now[0] - fingerprint_[0]) <= 1e-9 * math.sqrt(weight.numel() * fingerprint_[1]) + 1e-300)


def save_stats(stats: dict, path) -> None:
    """Write ``{layer name: LayerStats}`` to ``path`` with ``torch.save``."""
    torch.save({name: s.to_dict() for name, s in stats.items()}, path)


def load_stats(path, map_location=None) -> dict:
    """Read what :func:`save_stats` wrote (safe ``weights_only`` load): ``{layer name: LayerStats}``."""
    raw = torch.load(path, map_location=map_location, weights_only=True)
    return {name: LayerStats.from_dict(d) for name, d in raw.items()}


def conv_padding(conv: nn.Conv2d):
    """Padding of ``conv`` as ``(left, right, top, bottom)``, the order of ``F.pad`` (filled as
    ``conv.padding_mode`` says: zeros, reflect, replicate or circular).

    ``padding="same"`` pads ``dilation*(k−1)`` in total per axis, the odd one on the right/bottom,
    as PyTorch does. Raises ``ValueError`` for grouped convs.
    """
    if conv.groups != 1:
        raise ValueError(f"grouped conv (groups={conv.groups}) is not supported")
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _padded(conv: nn.Conv2d, x: torch.Tensor):
    """``(x, pad)``: ``x`` already padded if ``conv`` pads by reflect/replicate/circular, and the
    zero padding (left, right, top, bottom) left to apply."""
    pad = conv_padding(conv)
    if conv.padding_mode != "zeros" and any(pad):
        return F.pad(x, pad, mode=conv.padding_mode), (0, 0, 0, 0)
    return x, pad


def input_vectors(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vectors that ``layer``'s weight matrix multiplies, as rows [n, d].

    ``nn.Linear``: ``x`` [..., in_features] → [prod(...), in_features].
    ``nn.Conv2d``: ``x`` [N, S, H, W] → its im2col patches [N*Ho*Wo, S*kh*kw] with the layer's own
    padding, stride and dilation, entries ordered (s, i, j) like ``W.reshape(T, -1)``, so that
    ``input_vectors(conv, x) @ W.reshape(T, -1).T`` is the conv output without bias. (The result
    is the transpose of a contiguous [d, n] matrix: that copy is the cheapest to build from NCHW.)
    """
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x, pad = _padded(layer, x)
        if any(pad):
            x = F.pad(x, pad)
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        patches = windows[..., ::dh, ::dw]  # a view [N, S, Ho, Wo, kh, kw]
        return patches.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1).T
    raise ValueError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


_CHUNK_PIXELS = 8192   # per conv weight gradient, which sums a whole chunk in one float32 accumulator


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shifted_gram(conv: nn.Conv2d, x: torch.Tensor, y=None, pad=None) -> torch.Tensor:
    """:func:`patch_gram` of a stride-1 conv by its shift structure (see there); x, y [N, S, H, W]
    with zero padding ``pad`` (left, right, top, bottom; default the conv's)."""
    N, S, H, W = x.shape
    (kh, kw), dilation = conv.kernel_size, conv.dilation
    left, right, top, bottom = conv_padding(conv) if pad is None else pad
    Eh, Ew = (d * (k - 1) for d, k in zip(dilation, conv.kernel_size))   # the "full" padding
    y_ = x if y is None else y
    # C[s, s', a, b] = Σ_{n,q} x[n,s,q] y[n,s',q + Δ], Δ = dilation·(a − kh + 1, b − kw + 1)
    step = max(1, _CHUNK_PIXELS // (H * W))      # images per chunk; chunks are summed in float64
    C = sum(torch.nn.grad.conv2d_weight(y_[n:n + step], (S, S, 2 * kh - 1, 2 * kw - 1),
                                        x[n:n + step], padding=(Eh, Ew), dilation=dilation).double()
            for n in range(0, N, step)).to(x.dtype)
    # G[(s,i,j), (s',i',j')] = C[s, s', kh−1+i'−i, kw−1+j'−j]: with C flipped, a Hankel view
    C = C.permute(0, 2, 3, 1).flip(1, 2).contiguous()        # [s, a, b, s'], a = kh−1−i'+i
    s0, s1, s2, s3 = C.stride()
    G = C.as_strided((S, kh, kw, kh, kw, S), (s0, s1, s2, s1, s2, s3))    # [s, i, j, kh−1−i', ..]
    G = G.permute(0, 1, 2, 5, 3, 4).flip(4, 5).reshape(S * kh * kw, S * kh * kw)
    # minus the patches of the full conv (output [H+Eh, W+Ew]) that the layer does not have:
    # whole rows above and below the layer's output, then whole columns beside it
    (dh, dw), index = dilation, torch.arange(S * kh * kw, device=x.device).reshape(S, kh, kw)
    rows = range(max(0, Eh - top), min(H + Eh, H + bottom))
    cols = range(max(0, Ew - left), min(W + Ew, W + right))

    def taps(position, size, full, d, k):
        """The taps that read inside the image at a full-conv output ``position``, as a slice."""
        inside = [t for t in range(k) if 0 <= position - full + d * t < size]
        return slice(inside[0], inside[-1] + 1) if inside else None

    def strip(z, u, i):
        """Patches [N·(W+Ew), S·|i|·kw] of full-conv row u, restricted to the kernel rows i."""
        z = F.pad(z[:, :, u - Eh + dh * i.start:u - Eh + dh * (i.stop - 1) + 1:dh], (Ew, Ew))
        z = z.unfold(3, dw * (kw - 1) + 1, 1)[..., ::dw]              # [N, S, |i|, W+Ew, kw]
        return z.permute(0, 3, 1, 2, 4).reshape(-1, S * (i.stop - i.start) * kw)

    def column(z, v, j):
        """Patches [N·|rows|, S·kh·|j|] of full-conv column v at the layer's rows, kernel columns j."""
        z = F.pad(z[..., v - Ew + dw * j.start:v - Ew + dw * (j.stop - 1) + 1:dw], (0, 0, Eh, Eh))
        z = z.unfold(2, dh * (kh - 1) + 1, 1)[..., ::dh][:, :, rows.start:rows.stop]  # [N, S, R, |j|, kh]
        return z.permute(0, 2, 1, 4, 3).reshape(-1, S * kh * (j.stop - j.start))

    for u in [*range(rows.start), *range(rows.stop, H + Eh)]:
        i = taps(u, H, Eh, dh, kh)
        if i is not None:
            k = index[:, i].reshape(-1)
            px = strip(x, u, i)
            G[k[:, None], k[None, :]] -= px.T @ (px if y is None else strip(y, u, i))
    for v in [*range(cols.start), *range(cols.stop, W + Ew)]:
        j = taps(v, W, Ew, dw, kw)
        if j is not None:
            k = index[:, :, j].reshape(-1)
            px = column(x, v, j)
            G[k[:, None], k[None, :]] -= px.T @ (px if y is None else column(y, v, j))
    return G


def patch_gram(layer: nn.Module, x: torch.Tensor, y=None) -> torch.Tensor:
    """``Xᵀ Y`` [d, d] for ``X = input_vectors(layer, x)`` and ``Y`` the same of ``y`` (default
    ``x``): the sum over the layer's input vectors of ``x_p y_pᵀ``, in x's dtype (at least float32).

    For a stride-1 conv the patches are never built. Block ((i, j), (i', j')) of the Gram
    (kernel taps) is Σ_q x[q] y[q + Δ], Δ = dilation·(i' − i, j' − j), summed over the output
    positions q of the tap; over a "full" conv (padding dilation·(k − 1)) every tap visits every
    pixel once, so that sum is a correlation of x and y that depends on Δ alone. The
    (2kh − 1)(2kw − 1) correlations are one conv weight gradient; the few rows and columns of
    positions the full conv has and the layer has not are then subtracted. For a 3×3 conv this
    is about a third of the multiplications of ``X.T @ Y`` and avoids the 9-times larger patch
    matrix (``benchmarks/calibrate.py``). Other layers use ``X.T @ Y``.
    """
    if y is not None and y.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    x, y = _at_least_float32(x), None if y is None else _at_least_float32(y)
    if isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and x.dim() == 4:
        x, pad = _padded(layer, x)
        return _shifted_gram(layer, x, None if y is None else _padded(layer, y)[0], pad)
    X = input_vectors(layer, x)
    return X.T @ (X if y is None else input_vectors(layer, y))


def patch_sum(layer: nn.Module, x: torch.Tensor):
    """``(Σ_p x_p [d], n)``: the sum and number of ``layer``'s input vectors in ``x``.

    im2col is linear, so a conv's patch sum is that of the batch-summed image.
    """
    x = _at_least_float32(x)
    if isinstance(layer, nn.Conv2d):
        x = x.unsqueeze(0) if x.dim() == 3 else x
        X = input_vectors(layer, x.sum(0, keepdim=True))
        return X.sum(0), X.shape[0] * x.shape[0]
    X = input_vectors(layer, x)
    return X.sum(0), X.shape[0]


class _Accumulator:
    """Forward hook adding a layer's ``Σ x xᵀ``, ``Σ x`` and count into float64 totals."""

    def __init__(self, name: str):
        self.name, self.gram, self.total, self.count = name, None, None, 0

    def __call__(self, layer, inputs, output):
        x = inputs[0]
        G = patch_gram(layer, x)  # one batch in the activations' precision, then added in float64
        if not torch.isfinite(G.diagonal()).all():  # a NaN/inf entry of x shows in its Σ x_i²
            raise ValueError(f"layer {self.name!r}: its input holds NaN or infinite values")
        total, count = patch_sum(layer, x)
        if self.gram is None:
            self.gram = torch.zeros(G.shape, dtype=torch.float64, device=G.device)
            self.total = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
        self.gram += G
        self.total += total
        self.count += count

    def result(self, centered: bool, weight: torch.Tensor) -> LayerStats:
        gram = (self.gram + self.gram.T) / 2
        return LayerStats(gram / self.count, self.total / self.count, self.count, centered, fingerprint(weight))


def _select_layers(model: nn.Module, layers):
    """``{name: module}`` for the requested names (default: every Conv2d and Linear layer the
    factorizations support; a Plan: its factorized layers), checked."""
    from .plans import Plan, candidates, unsupported

    modules = dict(model.named_modules())
    if isinstance(layers, Plan):
        layers.check(model)
        layers = layers.compressed()
        if not layers:
            raise ValueError("the plan factorizes no layer: there is nothing to calibrate")
    if layers is None:
        selected = {n: modules[n] for n in candidates(model) if unsupported(n, modules[n], modules) is None}
        if not selected:
            raise ValueError("the model has no nn.Conv2d or nn.Linear layer that the factorizations support")
    else:
        if isinstance(layers, str):
            layers = [layers]
        selected = {}
        for name in layers:
            if name not in modules:
                raise ValueError(f"the model has no layer named {name!r}")
            if not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
                raise ValueError(f"layer {name!r} is a {type(modules[name]).__name__}, "
                                 "not nn.Conv2d or nn.Linear")
            selected[name] = modules[name]
        if not selected:
            raise ValueError("no layers requested")
    for name, m in selected.items():
        if isinstance(m, nn.Conv2d):
            try:
                conv_padding(m)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from None
    return selected


def _inputs(batch):
    """The input tensor of a batch: the batch itself, or the first entry of an (x, y) pair."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a tensor or an (x, y) pair per batch, got {type(batch).__name__}")
    if batch.dtype == torch.uint8:
        raise ValueError("the inputs are uint8 (raw image bytes): normalise them to float as the model expects "
                         "(e.g. torchvision's ToTensor and Normalize, or x.float() / 255 and the model's mean "
                         "and std)")
    return batch


def _batches(data, batch_size: int, limit):
    """Yield input batches [B, ...] from a tensor, a DataLoader or a Dataset, at most ``limit`` samples."""
    if isinstance(data, torch.Tensor):
        data = _inputs(data[:limit])
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    if not isinstance(data, torch.utils.data.DataLoader):
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(f"expected a tensor, a Dataset or a DataLoader, got {type(data).__name__}")
        if limit is not None and limit < len(data):
            data = torch.utils.data.Subset(data, range(limit))
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    seen = 0
    for batch in data:
        x = _inputs(batch)
        if limit is not None:
            x = x[:limit - seen]
        if len(x):
            yield x
        seen += len(x)
        if limit is not None and seen >= limit:
            return


def _num_samples(data, limit):
    """Number of samples that will be seen, if known (for the progress bar)."""
    try:
        n = len(data.dataset) if isinstance(data, torch.utils.data.DataLoader) else len(data)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


def calibrate(model: nn.Module, data, layers=None, batch_size: int = 128, limit=None,
              centered: bool = False, progress: bool = True) -> dict:
    """Input statistics of ``model``'s Conv2d/Linear layers over ``data``.

    ``data``: a Dataset of ``(x, y)`` pairs, a DataLoader of such batches, or a tensor of inputs
    [N, ...] (floating point, normalised as the model expects); at most ``limit`` samples are
    used. ``layers``: a :class:`~lowrank.plans.Plan` (its factorized layers: what
    ``compress(model, plan, stats)`` needs), or module names; by default every ``nn.Conv2d`` and
    ``nn.Linear`` that the factorizations support (grouped convs, attention projections and
    subclasses are skipped, as :func:`lowrank.plan` does) and the forward pass reaches. Forward
    hooks add each batch's ``Σ x xᵀ`` (see :func:`input_vectors`) into float64 accumulators on
    the model's device; memory is ``O(d²)`` per layer whatever the data size. The model runs in
    eval mode under ``torch.no_grad()`` and is left as it was (train/eval flags restored, hooks
    removed, even on error).

    Warns when a layer gets fewer input vectors than their length d (its Σ is then singular and
    the data-informed fit undetermined in the directions no input took), saying how many images
    each such layer needs. Raises ``RuntimeError`` for a requested layer the forward pass never
    reaches. Returns ``{name: LayerStats}`` in model order; ``centered`` sets what
    ``LayerStats.sigma`` is.
    """
    from .plans import check_model

    check_model(model)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    selected = _select_layers(model, layers)
    accumulators = {name: _Accumulator(name) for name in selected}
    handles = [m.register_forward_hook(accumulators[name]) for name, m in selected.items()]
    seen = 0
    try:
        with _eval(model), torch.no_grad(), tqdm(total=_num_samples(data, limit), unit="img",
                                                 desc="calibrate", disable=not progress) as bar:
            for x in _batches(data, int(batch_size), limit):
                model(_as_input(x, model))
                seen += len(x)
                bar.update(len(x))
    finally:
        for h in handles:
            h.remove()

    if seen == 0:
        raise ValueError("the calibration data is empty")
    unreached = [name for name, a in accumulators.items() if a.count == 0]
    if unreached and layers is not None:
        raise RuntimeError(f"the forward pass never reached these layers: {unreached}")
    stats = {name: a.result(centered, selected[name].weight) for name, a in accumulators.items() if a.count}
    _warn_if_few(stats, seen)
    return stats


def _warn_if_few(stats: dict, images: int):
    """Warn about the layers with fewer input vectors than their length (a singular Σ)."""
    short = {n: s for n, s in stats.items() if s.count < s.dim}
    if not short:
        return
    need = {n: math.ceil(s.dim * images / s.count) for n, s in short.items()}
    worst = sorted(need, key=need.get, reverse=True)
    listed = "; ".join(f"{n} needs {need[n]:,} (d = {short[n].dim:,}, {short[n].count / images:g} vectors "
                       f"per image)" for n in worst[:3])
    warnings.warn(f"{images:,} image{'s give' if images > 1 else ' gives'} fewer input vectors than their length d for "
                  f"{len(short)} of {len(stats)} layers, whose Σ is then singular (the fit is undetermined "
                  f"in the directions no input took): {listed}{'; …' * (len(short) > 3)}. Calibrate on at "
                  f"least {need[worst[0]]:,} images (limit=...), or pass the plan (layers=plan) to "
                  f"calibrate only the layers it factorizes", stacklevel=3)
