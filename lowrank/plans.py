"""A compression plan: which layer gets which decomposition at which rank, as plain data.

A :class:`Plan` maps layer names to entries (method, rank, configuration, parameters and MACs
before and after). It prints as a table, can be edited, survives a JSON round trip, and is enough
to rebuild the compressed architecture from the dense model (see :mod:`lowrank.surgery`).
"""
import fnmatch
import functools
import html
import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import measure
from .decompose.svd import channel_matrix, spatial_matrix
from .decompose.tucker import unfold
from .layers import (ChannelSVDConv2d, CPConv2d, LowRankLinear, SpatialSVDConv2d, Tucker2Conv2d, conv_config,
                     linear_config)

#: method name → (factorized conv class, extra constructor arguments). Linear layers always use SVD.
METHODS = {
    "svd": (ChannelSVDConv2d, {}),
    "spatial": (SpatialSVDConv2d, {}),
    "tucker2": (Tucker2Conv2d, {}),
    "cp": (CPConv2d, {"form": "4way"}),
    "cp3": (CPConv2d, {"form": "3way"}),
}
NORMS = ("frobenius", "data")


def layer_class(entry: dict):
    """Factorized class and extra arguments for a plan entry."""
    return (LowRankLinear, {}) if entry["type"] == "Linear" else METHODS[entry["method"]]


def build(entry: dict, device="meta"):
    """An (uninitialised, on ``device``) factorized layer of the shape ``entry`` describes."""
    cls, extra = layer_class(entry)
    rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
    with torch.device(device):
        return cls(**entry["config"], rank=rank, **extra)


def dense_layer(entry: dict, device="meta"):
    """An uninitialised dense layer of the shape ``entry`` describes."""
    with torch.device(device):
        return nn.Linear(**entry["config"]) if entry["type"] == "Linear" else nn.Conv2d(**entry["config"])


def cost(module, input_size) -> tuple[int, int]:
    """(parameters, MACs) of ``module`` on one input of shape ``input_size``."""
    return measure.params(module), measure.macs(module, tuple(input_size))


@dataclass
class Layer:
    """What a rank rule sees of one layer: its name, dense module, method and input size."""
    name: str
    module: nn.Module
    method: str
    input_size: tuple

    @property
    def type(self):
        return type(self.module).__name__

    @property
    def config(self):
        return linear_config(self.module) if self.type == "Linear" else conv_config(self.module)

    def entry(self, rank) -> dict:
        """A plan entry for this layer at ``rank`` (an int, or a pair for Tucker-2)."""
        rank = list(rank) if isinstance(rank, tuple) else rank
        return dict(type=self.type, method=self.method, rank=rank, config=self.config,
                    input=list(self.input_size))

    def cost(self, rank) -> tuple[int, int]:
        """(parameters, MACs) of the factorized layer at ``rank``."""
        return cost(build(self.entry(rank)), self.input_size)

    def params(self, rank) -> int:
        """Parameters of the factorized layer at ``rank`` (cheaper than :meth:`cost`)."""
        return measure.params(build(self.entry(rank)))

    @functools.cached_property
    def _dense_cost(self):
        return cost(dense_layer(self.entry(1)), self.input_size)

    def dense_cost(self) -> tuple[int, int]:
        """(parameters, MACs) of the dense layer."""
        return self._dense_cost

    def full_rank(self):
        """Largest meaningful rank: an int, or (T, S) for Tucker-2. CP has none (``None``)."""
        W = self.module.weight
        if self.type == "Linear":
            return min(W.shape)
        T, S, kh, kw = W.shape
        return {"svd": min(T, S * kh * kw), "spatial": min(S * kh, T * kw), "tucker2": (T, S)}.get(self.method)

    def matrices(self) -> list[torch.Tensor]:
        """The matrices whose spectra set the rank(s): one for SVDs, the two unfoldings for Tucker-2."""
        W = self.module.weight.detach()
        if self.type == "Linear" or self.method == "svd":
            return [channel_matrix(W) if W.dim() == 4 else W]
        if self.method == "spatial":
            return [spatial_matrix(W)]
        if self.method == "tucker2":
            return [unfold(W, 0), unfold(W, 1)]
        raise ValueError(f"{self.name}: method {self.method!r} has no matrix whose spectrum sets its rank")


class Plan:
    """Ordered layer name → entry. Entries are dicts of plain data:
    ``type``, ``method`` ("dense" when the layer is kept), ``rank``, ``config``, ``input``,
    ``params`` and ``macs`` as [dense, compressed], and a ``note``."""

    def __init__(self, layers: dict, model_params: int, model_macs: int, norm: str = "frobenius"):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.layers, self.model_params, self.model_macs, self.norm = dict(layers), model_params, model_macs, norm

    def __getitem__(self, name):
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def __eq__(self, other):
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def compressed(self):
        """Names of the layers the plan factorizes."""
        return [n for n, e in self.items() if e["method"] != "dense"]

    @property
    def params(self) -> int:
        """Parameters of the whole compressed model."""
        return self.model_params - sum(e["params"][0] - e["params"][1] for e in self.layers.values())

    @property
    def macs(self) -> int:
        """MACs of the whole compressed model."""
        return self.model_macs - sum(e["macs"][0] - e["macs"][1] for e in self.layers.values())

    def edit(self, name, method=None, rank=None):
        """Change one layer's method and/or rank; its costs are recomputed (``method="dense"`` keeps it)."""
        e = self.layers[name]
        method = method or (e["method"] if e["method"] != "dense" else None)
        if method is None:
            raise ValueError(f"{name}: give a method to factorize a layer the plan keeps dense")
        rank = e["rank"] if rank is None else rank
        if method == "dense":
            self.layers[name] = {**e, "method": "dense", "params": [e["params"][0]] * 2,
                                 "macs": [e["macs"][0]] * 2, "note": "kept dense by hand"}
            return self
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)} or 'dense'")
        layer = Layer(name, dense_layer(e), "svd" if e["type"] == "Linear" else method, tuple(e["input"]))
        self.layers[name] = _entry(layer, rank)
        return self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dict(layers=self.layers, model_params=self.model_params,
                                          model_macs=self.model_macs, norm=self.norm)))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(d["layers"], d["model_params"], d["model_macs"], d["norm"])

    def rows(self):
        for name, e in self.items():
            rank = "×".join(map(str, e["rank"])) if isinstance(e["rank"], list) else str(e["rank"])
            yield [name, "×".join(map(str, _shape(e))), e["method"], rank if e["method"] != "dense" else "",
                   f"{e['params'][0]:,} → {e['params'][1]:,}", f"{e['macs'][0]:,} → {e['macs'][1]:,}", e["note"]]

    def summary(self) -> str:
        return (f"{len(self.compressed())} of {len(self)} layers factorized ({self.norm} norm); model: "
                f"{self.model_params:,} → {self.params:,} parameters ({self.params / self.model_params:.1%}), "
                f"{self.model_macs:,} → {self.macs:,} MACs ({self.macs / self.model_macs:.1%})")

    HEAD = ["layer", "weight", "method", "rank", "params", "MACs", "note"]

    def __str__(self):
        rows = [self.HEAD] + list(self.rows())
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEAD))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines + [self.summary()])

    __repr__ = __str__

    def _repr_html_(self):
        cell = lambda tag, c: f"<{tag}>{html.escape(c)}</{tag}>"
        head = "".join(cell("th", c) for c in self.HEAD)
        body = "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in self.rows())
        return f"<table><tr>{head}</tr>{body}</table><p>{html.escape(self.summary())}</p>"


def _shape(e):
    c = e["config"]
    if e["type"] == "Linear":
        return [c["out_features"], c["in_features"]]
    return [c["out_channels"], c["in_channels"], *c["kernel_size"]]


def _entry(layer: Layer, rank) -> dict:
    """The plan entry of ``layer`` at ``rank``; kept dense (with a note) if that saves no parameters."""
    e = layer.entry(rank)
    dense, small = layer.dense_cost(), layer.cost(rank)
    e.update(params=[dense[0], small[0]], macs=[dense[1], small[1]], note="")
    if small[0] >= dense[0]:
        e.update(method="dense", params=[dense[0]] * 2, macs=[dense[1]] * 2,
                 note=f"rank {rank} would need {small[0]:,} ≥ {dense[0]:,} parameters")
    return e


def _selected(names, include, exclude):
    pick = lambda n, patterns: any(fnmatch.fnmatchcase(n, p) for p in patterns)
    chosen = [n for n in names if include is None or pick(n, include)]
    return [n for n in chosen if not (exclude and pick(n, exclude))]


def input_sizes(model, input_size) -> dict:
    """Input shape (without batch) of every Conv2d and Linear module on one input of ``input_size``."""
    sizes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            sizes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(record(name)))
    try:
        with measure._eval(model), torch.no_grad():
            model(torch.zeros(1, *input_size, device=measure._device(model)))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def plan(model, method: str = "svd", ranks=0.5, include=None, exclude=None, input_size=(3, 32, 32),
         norm: str = "frobenius") -> Plan:
    """Plan the compression of every Conv2d and Linear layer of ``model`` (filtered by
    ``include``/``exclude``: lists of names or shell patterns such as ``"layer*.conv*"``).

    ``method``: "svd" (channel SVD), "spatial", "tucker2", "cp" (4-way) or "cp3" (3-way) for
    convolutions; linear layers always get a truncated SVD. ``ranks``: an int (that rank, clipped
    to each layer's full rank), a float in (0, 1] (the share of each layer's parameters to keep),
    a dict name → rank (other layers stay dense), or a rank rule from :mod:`lowrank.ranks`.
    ``norm``: "frobenius" (plain decompositions) or "data" (data-informed; compress with stats).
    A layer whose factorization would not save parameters stays dense, and the plan says why.
    """
    from . import ranks as rules

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    sizes = input_sizes(model, input_size)
    modules = dict(model.named_modules())
    names = [n for n in _selected(sizes, include, exclude) if type(modules[n]) in (nn.Conv2d, nn.Linear)]
    for pattern in include or []:
        if pattern in modules and pattern not in sizes:
            raise ValueError(f"{pattern}: {type(modules[pattern]).__name__} is not a Conv2d or Linear layer "
                             f"reached by the forward pass")
    layers, skipped = [], {}
    for n in names:
        layer = Layer(n, modules[n], "svd" if isinstance(modules[n], nn.Linear) else method, sizes[n])
        try:
            layer.config  # raises ValueError for what the factorizations do not support
        except ValueError as error:
            if include is not None and n in include:
                raise ValueError(f"{n}: {error}") from None
            skipped[n] = str(error)
            continue
        layers.append(layer)
    if not layers:
        raise ValueError("no Conv2d or Linear layer selected: check include/exclude")
    chosen = rules.resolve(ranks, layers)
    entries = {}
    for layer in layers:
        if chosen.get(layer.name) is None:
            e = _entry(layer, 1)
            e.update(method="dense", rank=None, params=[e["params"][0]] * 2, macs=[e["macs"][0]] * 2,
                     note="no rank given")
        else:
            e = _entry(layer, chosen[layer.name])
        entries[layer.name] = e
    model_params, model_macs = cost(model, input_size)
    result = Plan(entries, model_params, model_macs, norm)
    result.skipped = skipped
    return result
