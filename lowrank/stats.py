"""Layer input statistics for the data-informed decompositions.

A layer ``y = W x`` (a linear layer, or a conv seen as the matrix ``W`` [T, S*kh*kw] acting on
im2col patches) changes its output on real inputs by ``‖(W − W̃) X‖_F`` when ``W`` is replaced
by ``W̃``, where the columns of ``X`` are the layer's input vectors. Only ``Σ = X Xᵀ / n``
enters that error, so :func:`calibrate` runs a calibration set through the model once and keeps,
per layer, ``Σ x xᵀ``, ``Σ x`` and the count ``n`` — never the activations themselves.
"""
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
    """

    second_moment: torch.Tensor
    mean: torch.Tensor
    count: int
    centered: bool = False

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
                "count": int(self.count), "centered": bool(self.centered)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        """Inverse of :meth:`to_dict`."""
        return cls(d["second_moment"], d["mean"], int(d["count"]), bool(d["centered"]))


def save_stats(stats: dict, path) -> None:
    """Write ``{layer name: LayerStats}`` to ``path`` with ``torch.save``."""
    torch.save({name: s.to_dict() for name, s in stats.items()}, path)


def load_stats(path, map_location=None) -> dict:
    """Read what :func:`save_stats` wrote (safe ``weights_only`` load): ``{layer name: LayerStats}``."""
    raw = torch.load(path, map_location=map_location, weights_only=True)
    return {name: LayerStats.from_dict(d) for name, d in raw.items()}


def conv_padding(conv: nn.Conv2d):
    """Zero padding of ``conv`` as ``(left, right, top, bottom)``, the order of ``F.pad``.

    ``padding="same"`` pads ``dilation*(k−1)`` in total per axis, the odd one on the right/bottom,
    as PyTorch does. Raises ``ValueError`` for grouped convs and padding modes other than zeros.
    """
    if conv.groups != 1:
        raise ValueError(f"grouped conv (groups={conv.groups}) is not supported")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported, only 'zeros'")
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


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
        pad = conv_padding(layer)
        if any(pad):
            x = F.pad(x, pad)
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        patches = windows[..., ::dh, ::dw]  # a view [N, S, Ho, Wo, kh, kw]
        return patches.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1).T
    raise ValueError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


class _Accumulator:
    """Forward hook adding a layer's ``Σ x xᵀ``, ``Σ x`` and count into float64 totals."""

    def __init__(self, name: str):
        self.name, self.gram, self.total, self.count = name, None, None, 0

    def __call__(self, layer, inputs, output):
        X = input_vectors(layer, inputs[0])
        X = X.to(torch.promote_types(X.dtype, torch.float32))
        G = X.T @ X  # one batch in the activations' precision, then added in float64
        if not torch.isfinite(G.diagonal()).all():  # a NaN/inf entry of x shows in its Σ x_i²
            raise ValueError(f"layer {self.name!r}: its input holds NaN or infinite values")
        if self.gram is None:
            self.gram = torch.zeros(G.shape, dtype=torch.float64, device=G.device)
            self.total = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
        self.gram += G
        self.total += X.sum(0)
        self.count += X.shape[0]

    def result(self, centered: bool) -> LayerStats:
        gram = (self.gram + self.gram.T) / 2
        return LayerStats(gram / self.count, self.total / self.count, self.count, centered)


def _select_layers(model: nn.Module, layers):
    """``{name: module}`` for the requested names (default: every Conv2d and Linear), checked."""
    modules = dict(model.named_modules())
    if layers is None:
        selected = {n: m for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
        if not selected:
            raise ValueError("the model has no nn.Conv2d or nn.Linear layer")
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
    return batch


def _batches(data, batch_size: int, limit):
    """Yield input batches [B, ...] from a tensor, a DataLoader or a Dataset, at most ``limit`` samples."""
    if isinstance(data, torch.Tensor):
        data = data[:limit]
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
    [N, ...]; at most ``limit`` samples are used. ``layers``: module names (default: every
    ``nn.Conv2d`` and ``nn.Linear``). Forward hooks add each batch's ``Σ x xᵀ`` (see
    :func:`input_vectors`) into float64 accumulators on the model's device; memory is ``O(d²)``
    per layer whatever the data size. The model runs in eval mode under ``torch.no_grad()``
    and is left as it was (train/eval flags restored, hooks removed, even on error).

    Returns ``{name: LayerStats}`` in model order; ``centered`` sets what ``LayerStats.sigma`` is.
    """
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
    if unreached:
        raise RuntimeError(f"the forward pass never reached these layers: {unreached}")
    return {name: a.result(centered) for name, a in accumulators.items()}
