"""A compression plan: which layer gets which decomposition at which rank, as plain data.

A :class:`Plan` maps layer names to entries (method, rank, configuration, parameters and MACs
before and after). It prints as a table, can be edited, survives a JSON round trip, and is enough
to rebuild the compressed architecture from the dense model (see :mod:`lowrank.surgery`). It also
lists the model's layers it does not plan (``skipped``, with the reason) and the model's
parameter count, so that it is refused on a model it was not made for.
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
                     grouped, linear_config)

#: method name → (factorized conv class, extra constructor arguments). Linear layers always use SVD.
METHODS = {
    "svd": (ChannelSVDConv2d, {}),
    "spatial": (SpatialSVDConv2d, {}),
    "tucker2": (Tucker2Conv2d, {}),
    "cp": (CPConv2d, {"form": "4way"}),
    "cp3": (CPConv2d, {"form": "3way"}),
}
NORMS = ("frobenius", "data")
#: the modules a plan accounts for: each is planned, or listed in ``Plan.skipped`` with the reason
CANDIDATES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
#: the layers :func:`lowrank.compress` puts in place
FACTORIZED = (LowRankLinear, ChannelSVDConv2d, SpatialSVDConv2d, Tucker2Conv2d, CPConv2d)
#: what every plan entry holds (``params`` and ``macs`` are recomputed from these)
FIELDS = ("type", "method", "rank", "config", "input")


def check_model(model):
    """Raise ``TypeError`` for what is not a plain ``nn.Module`` whose layers can be replaced:
    a wrapper (DataParallel, DistributedDataParallel, torch.compile) says which model to pass."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("a TorchScript model (torch.jit.script/trace) holds compiled code, not replaceable "
                        "layers: plan and compress the Python model, then script the compressed one")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"the model is wrapped in {type(model).__name__}: pass model.module (the model "
                        "inside), then wrap the compressed model again")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError("the model is compiled by torch.compile: pass model._orig_mod (the model inside), "
                        "then compile the compressed model again")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def unsupported(name: str, module: nn.Module, modules: dict):
    """Why the factorizations cannot replace ``module`` (a :data:`CANDIDATES` member named
    ``name`` in ``modules``, the model's ``named_modules()``), or ``None`` if they can."""
    parent = modules.get(name.rpartition(".")[0])
    if isinstance(module, nn.MultiheadAttention):
        return ("attention: nn.MultiheadAttention multiplies by its in_proj_weight and out_proj.weight "
                "itself, so no layer of it can be replaced")
    if isinstance(parent, nn.MultiheadAttention):
        return "projection inside nn.MultiheadAttention, which uses its weight directly (never calls it)"
    kind = next((k for k in (nn.Conv2d, nn.Linear) if isinstance(module, k)), None)
    if kind is None:
        return f"{type(module).__name__} layers are not factorized (only nn.Conv2d and nn.Linear are)"
    if kind is nn.Conv2d and module.groups != 1:   # the reason that holds whatever the class
        return grouped(module)
    if type(module) is not kind:
        return (f"{type(module).__name__} is a subclass of nn.{kind.__name__}: its forward may differ "
                f"from the plain layer's, so it is not replaced")
    try:
        conv_config(module) if kind is nn.Conv2d else linear_config(module)
    except ValueError as error:
        return str(error)
    return None


def candidates(model) -> list:
    """Names of ``model``'s :data:`CANDIDATES` modules, in model order (each module once)."""
    return [n for n, m in model.named_modules() if isinstance(m, CANDIDATES)]


def layer_class(entry: dict):
    """Factorized class and extra arguments for a plan entry."""
    return (LowRankLinear, {}) if entry["type"] == "Linear" else METHODS[entry["method"]]


def entry_rank(entry: dict):
    """The entry's rank as the factorized layer takes it (a pair for Tucker-2), checked."""
    rank, method = entry["rank"], entry["method"]
    if entry["type"] == "Conv2d" and method == "tucker2":
        if isinstance(rank, (list, tuple)) and len(rank) == 2:
            return tuple(rank)
        if isinstance(rank, int) and not isinstance(rank, bool):
            return rank
        raise ValueError(f"a tucker2 rank is an int or a pair [rT, rS], got {rank!r}")
    if isinstance(rank, (list, tuple)):
        raise ValueError(f"a {method} rank is one integer, got {rank!r}")
    return rank


def build(entry: dict, device="meta"):
    """An (uninitialised, on ``device``) factorized layer of the shape ``entry`` describes."""
    cls, extra = layer_class(entry)
    with torch.device(device):
        return cls(**entry["config"], rank=entry_rank(entry), **extra)


def dense_layer(entry: dict, device="meta"):
    """An uninitialised dense layer of the shape ``entry`` describes."""
    with torch.device(device):
        return nn.Linear(**entry["config"]) if entry["type"] == "Linear" else nn.Conv2d(**entry["config"])


def cost(module, input_size) -> tuple[int, int]:
    """(parameters, MACs) of ``module`` on one input of shape ``input_size``."""
    return measure.params(module), measure.macs(module, tuple(input_size))


@dataclass
class Layer:
    """What a rank rule sees of one layer: its name, dense module, method and input size
    (and how many times one forward pass of the model calls it)."""
    name: str
    module: nn.Module
    method: str
    input_size: tuple
    calls: int = 1

    @property
    def type(self):
        return type(self.module).__name__

    @property
    def config(self):
        return linear_config(self.module) if self.type == "Linear" else conv_config(self.module)

    def entry(self, rank) -> dict:
        """A plan entry for this layer at ``rank`` (an int, or a pair for Tucker-2)."""
        rank = list(rank) if isinstance(rank, tuple) else rank
        e = dict(type=self.type, method=self.method, rank=rank, config=self.config, input=list(self.input_size))
        return e if self.calls == 1 else {**e, "calls": self.calls}

    def cost(self, rank) -> tuple[int, int]:
        """(parameters, MACs) of the factorized layer at ``rank`` (MACs of one call)."""
        return cost(build(self.entry(rank)), self.input_size)

    def params(self, rank) -> int:
        """Parameters of the factorized layer at ``rank`` (cheaper than :meth:`cost`)."""
        return measure.params(build(self.entry(rank)))

    @functools.cached_property
    def _dense_cost(self):
        return cost(dense_layer(self.entry(1)), self.input_size)

    def dense_cost(self) -> tuple[int, int]:
        """(parameters, MACs) of the dense layer (MACs of one call)."""
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


def _key(e: dict):
    """What an entry's costs depend on."""
    return tuple(repr(e.get(k)) for k in (*FIELDS, "calls"))


def _check_fields(name: str, e: dict):
    missing = [k for k in FIELDS if k not in e] if isinstance(e, dict) else list(FIELDS)
    if missing:
        raise ValueError(f"{name}: the plan entry lacks {missing}; make entries with lowrank.plan and change "
                         f"them with Plan.edit")


def _priced(name: str, e: dict) -> dict:
    """``e`` with its ``params`` and ``macs`` recomputed from its other fields (checked)."""
    _check_fields(name, e)
    if e["type"] not in ("Conv2d", "Linear"):
        raise ValueError(f"{name}: type {e['type']!r} is not 'Conv2d' or 'Linear'")
    method, choices = e["method"], sorted(METHODS) + ["dense"]
    if method not in choices or (e["type"] == "Linear" and method not in ("svd", "dense")):
        allowed = ["svd", "dense"] if e["type"] == "Linear" else choices
        raise ValueError(f"{name}: unknown method {method!r} for a {e['type']} layer; choose from {allowed} "
                         f"(plan.edit({name!r}, method=...))")
    calls = e.get("calls", 1)
    try:
        dense = cost(dense_layer(e), e["input"])
        small = dense if method == "dense" else cost(build(e), e["input"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} ({method}, rank {e['rank']!r}): {error}; change it with "
                         f"plan.edit({name!r}, rank=...)") from None
    e.update(params=[dense[0], small[0]], macs=[calls * dense[1], calls * small[1]])
    if method != "dense":
        e["note"] = "" if small[0] < dense[0] else f"saves nothing ({small[0]:,} ≥ {dense[0]:,} parameters)"
    e.setdefault("note", "")
    return e


class Plan:
    """Ordered layer name → entry. Entries are dicts of plain data:
    ``type``, ``method`` ("dense" when the layer is kept), ``rank``, ``config``, ``input``,
    ``params`` and ``macs`` as [dense, compressed], and a ``note``.

    ``skipped``: the model's other layers (those the factorizations do not support, excluded by
    ``include``/``exclude``, or not reached by the forward pass), name → ``type``, ``weight``
    shape, ``kind`` and ``reason``. An entry edited by hand (``plan["conv1"]["rank"] = 4``) gets
    its costs recomputed wherever the plan reports them (print, ``params``, ``macs``, JSON) and
    is checked then; :meth:`edit` also keeps dense a layer whose factorization saves nothing.
    """

    def __init__(self, layers: dict, model_params: int, model_macs: int, norm: str = "frobenius",
                 skipped: dict | None = None):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.layers, self.model_params, self.model_macs, self.norm = dict(layers), model_params, model_macs, norm
        self.skipped = None if skipped is None else dict(skipped)
        self._keys = {}  # name → _key of the entry when its costs were computed

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

    def check(self, model=None) -> "Plan":
        """Recompute the costs of entries edited by hand, checking each (``ValueError`` naming the
        layer). With ``model``: also raise ``ValueError`` unless the plan fits it (the same
        layers, shapes and parameter count as the model it was made for). Returns the plan."""
        for name, e in self.items():
            _check_fields(name, e)
        if model is not None:
            self._check_fits(model)
        for name, e in self.items():
            key = _key(e)
            if self._keys.get(name) != key:
                _priced(name, e)
                self._keys[name] = key
            if self.norm == "data" and e["type"] == "Conv2d" and e["method"] == "spatial":
                raise ValueError(f"{name}: spatial SVD has no data-informed version (its factors do not act "
                                 f"on whole input patches): use 'svd', 'tucker2', 'cp' or 'cp3'")
        return self

    def _check_fits(self, model):
        check_model(model)
        modules = dict(model.named_modules())
        remake = "make the plan for this model with lowrank.plan(model, ...)"
        for name, e in self.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"the plan names a layer {name!r} that the model does not have: {remake}")
            if isinstance(module, FACTORIZED):
                raise ValueError(f"{name} is already factorized ({type(module).__name__}): compress the dense "
                                 f"model, or plan this one anew with lowrank.plan")
            try:
                config = Layer(name, module, e["method"], ()).config
            except ValueError:
                config = None
            if type(module).__name__ != e["type"] or config != e["config"]:
                raise ValueError(f"{name}: the model's {type(module).__name__} {config} does not match the plan's "
                                 f"{e['type']} {e['config']}: {remake}")
        if self.skipped is not None:
            have, planned = candidates(model), set(self.layers) | set(self.skipped)
            extra, absent = [n for n in have if n not in planned], sorted(planned - set(have))
            if extra or absent:
                raise ValueError(f"the plan was made for another model: this one has layers the plan does not "
                                 f"list {extra[:3]} and lacks layers it lists {absent[:3]}: {remake}")
        n = measure.params(model)
        if n != self.model_params:
            raise ValueError(f"the plan was made for a model of {self.model_params:,} parameters, this one has "
                             f"{n:,}: {remake}")

    @property
    def params(self) -> int:
        """Parameters of the whole compressed model."""
        self.check()
        return self.model_params - sum(e["params"][0] - e["params"][1] for e in self.layers.values())

    @property
    def macs(self) -> int:
        """MACs of the whole compressed model."""
        self.check()
        return self.model_macs - sum(e["macs"][0] - e["macs"][1] for e in self.layers.values())

    def edit(self, name, method=None, rank=None):
        """Change one layer's method and/or rank; its costs are recomputed (``method="dense"`` keeps it)."""
        if name not in self.layers:
            why = f": {self.skipped[name]['reason']}" if self.skipped and name in self.skipped else ""
            raise ValueError(f"the plan has no entry {name!r}{why}")
        e = self.layers[name]
        method = method or (e["method"] if e["method"] != "dense" else None)
        if method is None:
            raise ValueError(f"{name}: give a method to factorize a layer the plan keeps dense")
        rank = e["rank"] if rank is None else rank
        if rank is None and method != "dense":
            raise ValueError(f"{name}: give a rank (plan.edit({name!r}, rank=...)): the plan has none for it")
        if method == "dense":
            self.layers[name] = {**e, "method": "dense", "note": "kept dense by hand"}
            self.check()
            return self
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)} or 'dense'")
        layer = Layer(name, dense_layer(e), "svd" if e["type"] == "Linear" else method, tuple(e["input"]),
                      e.get("calls", 1))
        try:
            self.layers[name] = _entry(layer, entry_rank({**e, "method": layer.method, "rank": rank}))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        self._keys[name] = _key(self.layers[name])
        return self

    def to_dict(self) -> dict:
        self.check()
        d = dict(layers=self.layers, model_params=self.model_params, model_macs=self.model_macs, norm=self.norm)
        if self.skipped is not None:
            d["skipped"] = self.skipped
        return json.loads(json.dumps(d))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan :meth:`to_json` wrote (costs recomputed and checked: ``ValueError`` if it is not one)."""
        d = json.loads(text)
        missing = [k for k in ("layers", "model_params", "model_macs", "norm") if k not in d] if isinstance(
            d, dict) else ["everything"]
        if missing:
            raise ValueError(f"not a lowrank plan: the JSON lacks {missing} (plans are written by Plan.to_json)")
        return cls(d["layers"], d["model_params"], d["model_macs"], d["norm"], d.get("skipped")).check()

    def rows(self):
        self.check()
        for name, e in self.items():
            rank = "×".join(map(str, e["rank"])) if isinstance(e["rank"], list) else str(e["rank"])
            yield [name, "×".join(map(str, _shape(e))), e["method"], rank if e["method"] != "dense" else "",
                   f"{e['params'][0]:,} → {e['params'][1]:,}", f"{e['macs'][0]:,} → {e['macs'][1]:,}", e["note"]]
        for name, s in (self.skipped or {}).items():
            yield [name, "×".join(map(str, s["weight"] or [])), "skipped", "", "", "", s["reason"]]

    def summary(self) -> str:
        kinds = {}
        for e in self.layers.values():
            if e["method"] == "dense":
                kind = "no saving" if e["note"].startswith("rank") else (
                    "no rank given" if e["note"] == "no rank given" else
                    "by the rank rule" if e["note"].startswith("kept dense by the rank rule") else "by hand")
                kinds[kind] = kinds.get(kind, 0) + 1
        for s in (self.skipped or {}).values():
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        dense = sum(kinds.values())
        why = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if dense else ""
        f = len(self.compressed())
        return (f"{f + dense} layers: {f} factorized, {dense} kept dense{why}; {self.norm} norm; model: "
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
    (dense, dense_macs), (small, small_macs) = layer.dense_cost(), layer.cost(rank)
    e.update(params=[dense, small], macs=[layer.calls * dense_macs, layer.calls * small_macs], note="")
    if small >= dense:
        e.update(method="dense", params=[dense] * 2, macs=[e["macs"][0]] * 2,
                 note=f"rank {rank} would need {small:,} ≥ {dense:,} parameters")
    return e


def _probe(model, input_size, kinds=CANDIDATES):
    """``({name: input shape without batch}, {name: calls})`` of every module of ``kinds``
    (default :data:`CANDIDATES`) on one input of ``input_size`` (in the model's dtype, on its
    device)."""
    sizes, calls, hooks = {}, {}, []

    def record(name):
        def hook(module, args, kwargs, output):
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if x is not None:
                sizes.setdefault(name, tuple(x.shape[1:]))
            calls[name] = calls.get(name, 0) + 1
        return hook

    for name, m in model.named_modules():
        if isinstance(m, kinds):
            hooks.append(m.register_forward_hook(record(name), with_kwargs=True))
    try:
        with measure._eval(model), torch.no_grad():
            model(measure.zeros(model, input_size))
    finally:
        for h in hooks:
            h.remove()
    return sizes, calls


def input_sizes(model, input_size) -> dict:
    """Input shape (without batch) of every Conv2d and Linear module on one input of ``input_size``."""
    return {n: s for n, s in _probe(model, input_size)[0].items()
            if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))}


def _match(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(model, method: str = "svd", ranks=0.5, include=None, exclude=None, input_size=(3, 32, 32),
         norm: str = "frobenius") -> Plan:
    """Plan the compression of every Conv2d and Linear layer of ``model`` (filtered by
    ``include``/``exclude``: lists of names or shell patterns such as ``"layer*.conv*"``).

    ``method``: "svd" (channel SVD), "spatial", "tucker2", "cp" (4-way) or "cp3" (3-way) for
    convolutions; linear layers always get a truncated SVD. ``ranks``: an int (that rank, clipped
    to each layer's full rank), a float in (0, 1] (the share of each layer's parameters to keep),
    a dict name → rank (other layers stay dense), or a rank rule from :mod:`lowrank.ranks`.
    ``norm``: "frobenius" (plain decompositions) or "data" (data-informed; compress with stats).
    One input of ``input_size`` (in the model's dtype, on its device) finds each layer's input.

    A layer whose factorization would not save parameters stays dense, and the plan says why.
    Every other Conv/Linear/attention module is listed in ``plan.skipped`` with the reason: the
    factorizations do not support it (grouped or depthwise convs, Conv1d/Conv3d/ConvTranspose,
    subclasses of Conv2d/Linear, attention), ``include``/``exclude`` left it out, or the forward
    pass never reached it. A layer named in ``include`` that cannot be planned raises
    ``ValueError``, as does a selected layer whose weight holds NaN or infinite values.
    """
    from . import ranks as rules

    check_model(model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "data" and method == "spatial":
        raise ValueError("spatial SVD has no data-informed version (its factors do not act on whole input "
                         "patches): use 'svd', 'tucker2', 'cp' or 'cp3' with norm='data'")
    sizes, calls = _probe(model, input_size)
    modules = dict(model.named_modules())
    for pattern in include or []:
        if pattern in modules and not isinstance(modules[pattern], CANDIDATES):
            raise ValueError(f"{pattern}: {type(modules[pattern]).__name__} is not a Conv2d or Linear layer")
    layers, skipped = [], {}
    for n in candidates(model):
        m = modules[n]
        if n == "":
            raise ValueError(f"the model is itself one {type(m).__name__}: plan nn.Sequential(model) instead")
        reason, kind = unsupported(n, m, modules), "not supported"
        if reason is None and n not in sizes:
            reason, kind = f"not reached by the forward pass on an input of size {tuple(input_size)}", "not reached"
        if reason is not None and include is not None and n in include:
            raise ValueError(f"{n}: {reason}")
        if reason is None and include is not None and not _match(n, include):
            reason, kind = "not matched by include", "excluded"
        if reason is None and exclude and _match(n, exclude):
            reason, kind = "matched by exclude", "excluded"
        if reason is not None:
            weight = getattr(m, "weight", getattr(m, "in_proj_weight", None))
            skipped[n] = dict(type=type(m).__name__, weight=None if weight is None else list(weight.shape),
                              kind=kind, reason=reason)
            continue
        if not all(torch.isfinite(p).all() for p in m.parameters(recurse=False)):
            raise ValueError(f"{n}: the weight or bias holds NaN or infinite values: fix the model (a diverged "
                             f"training run?) or exclude the layer (exclude=[{n!r}])")
        layers.append(Layer(n, m, "svd" if isinstance(m, nn.Linear) else method, sizes[n], calls.get(n, 1)))
    if not layers:
        raise ValueError("no Conv2d or Linear layer selected: check include/exclude (and plan.skipped: "
                         f"{ {n: s['reason'] for n, s in list(skipped.items())[:3]} })")
    chosen = rules.resolve(ranks, layers)
    entries = {}
    for layer in layers:
        if chosen.get(layer.name) is None:
            e = _entry(layer, 1)
            e.update(method="dense", rank=None, params=[e["params"][0]] * 2, macs=[e["macs"][0]] * 2,
                     note=getattr(ranks, "notes", {}).get(layer.name, "no rank given"))
        else:
            e = _entry(layer, chosen[layer.name])
        entries[layer.name] = e
    model_params, model_macs = cost(model, input_size)
    result = Plan(entries, model_params, model_macs, norm, skipped)
    result._keys = {n: _key(e) for n, e in entries.items()}
    return result
