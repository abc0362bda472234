"""Model surgery: apply a plan to a model, and rebuild a compressed model from its plan."""
import copy
import inspect

import torch
from tqdm.auto import tqdm

from . import measure
from .decompose.cp import cp_als
from .decompose.weighted import ridged, weighted_cp, weighted_tucker2
from .informed import factorize
from .layers import CPConv2d
from .plans import METHODS, Plan, build, check_model, entry_rank, layer_class
from .stats import same_weights


def _replace(model, name, new):
    """Put ``new`` in place of the module ``name`` under each name it has in ``model``."""
    old = model.get_submodule(name)
    for alias in [n for n, m in model.named_modules(remove_duplicate=False) if m is old]:
        parent, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _calls(norm: str, entry: dict) -> list:
    """The functions that factorize ``entry``'s layer, in the order their keyword options pass on."""
    if norm == "data":   # lowrank.informed.factorize passes options to the ALS only
        if entry["type"] == "Linear":
            return []
        return {"tucker2": [weighted_tucker2], "cp": [weighted_cp], "cp3": [weighted_cp]}.get(entry["method"], [])
    cls, _ = layer_class(entry)
    return [cls.from_dense, cp_als] if cls is CPConv2d else [cls.from_dense]


def _keywords(functions) -> set:
    """The keyword options a chain of calls takes: each function's parameters with a default (the
    package sets ``form``); a ``**kwargs`` passes them on to the next function."""
    names = set()
    for f in functions:
        parameters = inspect.signature(f).parameters.values()
        names |= {p.name for p in parameters if p.default is not p.empty and p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names - {"form"}


def _options(plan: Plan, options: dict) -> dict:
    """``{name: the options its factorization takes}`` for the plan's factorized layers.

    An option that no method of the plan's norm takes raises ``ValueError`` (saying which
    methods take it); one that only methods absent from this plan take is ignored, so that one
    set of options serves plans of several methods; ``ridge`` with a frobenius plan is CP-ALS's
    and must reach a CP layer.
    """
    kind = lambda e: e["method"] if e["type"] == "Conv2d" else "Linear"
    entry = lambda m: {"type": "Linear" if m == "Linear" else "Conv2d", "method": "svd" if m == "Linear" else m}
    per_layer = {n: _keywords(_calls(plan.norm, plan[n])) for n in plan.compressed()}
    of_norm = set().union(*(_keywords(_calls(plan.norm, entry(m))) for m in [*METHODS, "Linear"]))
    for option in options:
        if any(option in keys for keys in per_layer.values()) or (option in of_norm and option != "ridge"):
            continue
        where = [f"{m} ({norm})" for norm in ("frobenius", "data") for m in [*METHODS, "Linear"]
                 if option in _keywords(_calls(norm, entry(m)))]
        where += ["compress itself with norm='data' (the ridge of Σ)"] * (option == "ridge")
        takes = {kind(plan[n]): sorted(keys) for n, keys in per_layer.items() if keys}
        raise ValueError(f"no layer of this plan ({', '.join(sorted({kind(plan[n]) for n in per_layer}))}; "
                         f"{plan.norm} norm) takes the option {option!r}; "
                         + (f"it is an option of {', '.join(where)}" if where else "no method takes it")
                         + "".join(f"; {m} takes {k}" for m, k in takes.items()))
    return {n: {k: v for k, v in options.items() if k in per_layer[n]} for n in per_layer}


def _check_stats(model, plan: Plan, stats):
    """``ValueError`` unless ``stats`` fits the plan: none for a frobenius plan; for a data-informed
    one, statistics of every factorized layer, of its size and calibrated on its weights."""
    if plan.norm != "data":
        if stats is not None:
            raise ValueError("stats are used by data-informed plans only, and this plan uses the frobenius "
                             "norm: make it with lowrank.plan(..., norm='data'), or drop stats")
        return
    missing = [n for n in plan.compressed() if stats is None or n not in stats]
    if missing:
        raise ValueError(f"a data-informed plan needs statistics for {missing[:3]}{'…' * (len(missing) > 3)}: "
                         f"pass stats=lowrank.calibrate(model, data, plan)")
    for name in plan.compressed():
        weight, s = model.get_submodule(name).weight, stats[name]
        if s.dim != weight[0].numel():
            raise ValueError(f"{name}: the statistics are of vectors of length {s.dim}, the layer takes "
                             f"{weight[0].numel()} inputs per output: calibrate this model "
                             f"(lowrank.calibrate(model, data, plan))")
        if s.fingerprint is not None and not same_weights(s.fingerprint, weight):
            raise ValueError(f"{name}: the statistics were calibrated on other weights (another model, or "
                             f"weights changed since): calibrate this model (lowrank.calibrate(model, data, plan))")


def _check_weights(model, plan: Plan):
    for name in plan.compressed():
        if not all(torch.isfinite(p).all() for p in model.get_submodule(name).parameters(recurse=False)):
            raise ValueError(f"{name}: the weight or bias holds NaN or infinite values: fix the model (a diverged "
                             f"training run?) or keep the layer dense (plan.edit({name!r}, method='dense'))")


def prepare(model, plan: Plan, options: dict) -> dict:
    """Check ``model``, ``plan`` and the ``options`` of a compression before any work:
    returns :func:`_options`."""
    check_model(model)
    if not isinstance(plan, Plan):
        raise TypeError(f"expected a Plan (from lowrank.plan), got {type(plan).__name__}")
    plan.check(model)
    _check_weights(model, plan)
    return _options(plan, options)


def _failed(name, entry, dense, error):
    """The error of a layer's factorization, naming the layer (and what to do when it is zero)."""
    hint = ""
    if not dense.weight.detach().any():
        hint = f"; the weight is all zero: keep the layer dense (plan.edit({name!r}, method='dense'))"
    return ValueError(f"{name} ({entry['method']}, rank {entry['rank']}): {error}{hint}")


def compress(model, plan: Plan, stats=None, progress: bool = True, ridge: float | None = None, **options):
    """A NEW model in which every layer the plan factorizes is replaced by its factorized layer
    (under every name the layer has in the model).

    ``model`` is left untouched; it must be the model the plan was made for (``ValueError``
    otherwise). With a plan made with ``norm="data"``, ``stats`` (from
    :func:`lowrank.calibrate` on this model) must hold the statistics of every factorized layer,
    and each layer minimises its output error plus ``ridge``-weighted weight error (Σ + δ I, see
    :func:`lowrank.decompose.weighted.ridged`; default ``ridge=1e-3``). ``options`` go to the
    decompositions that take them (e.g. ``n_iter_max`` to CP-ALS, ``n_iter`` to the Σ-weighted
    ALS; with a frobenius plan ``ridge`` is CP-ALS's ridge), read from their signatures. Before
    any work, an option that no method of the plan's norm takes raises ``ValueError`` (naming the
    methods that take it); a layer whose method does not take an option ignores it, so one set
    of options serves plans of several methods. An error in a layer's factorization names it.
    """
    if plan.norm == "data":
        ridge = 1e-3 if ridge is None else ridge
    elif ridge is not None:
        options = {**options, "ridge": ridge}
    per_layer = prepare(model, plan, options)
    _check_stats(model, plan, stats)
    new = copy.deepcopy(model)
    for name in tqdm(plan.compressed(), desc="compressing", disable=not progress, leave=False):
        entry = plan[name]
        dense = new.get_submodule(name)
        try:
            if plan.norm == "data":
                layer = factorize(dense, entry, ridged(stats[name].sigma, ridge), **per_layer[name])
            else:
                cls, extra = layer_class(entry)
                layer = cls.from_dense(dense, entry_rank(entry), **extra, **per_layer[name])
        except (ValueError, torch.linalg.LinAlgError) as error:
            raise _failed(name, entry, dense, error) from error
        layer.train(dense.training)
        _replace(new, name, layer)
    return new


def structure(model, plan: Plan):
    """A copy of ``model`` with the plan's factorized layers in place, uninitialised (same device
    and dtype as the layers they replace): the architecture to load a compressed state_dict into.
    ``ValueError`` unless the plan was made for ``model``."""
    check_model(model)
    plan.check(model)
    new = copy.deepcopy(model)
    for name in plan.compressed():
        dense = new.get_submodule(name)
        layer = build(plan[name], device=dense.weight.device).to(dense.weight.dtype)
        layer.train(dense.training)
        _replace(new, name, layer)
    return new


def save(path, model, plan: Plan):
    """Save a compressed model as its plan (JSON text) and its state_dict, no pickled code.

    Raises ``ValueError`` unless ``model`` is the compressed model of ``plan`` (its factorized
    layers of the plan's methods and ranks, its parameter count the plan's).
    """
    check_model(model)
    plan.check()
    for name in plan.compressed():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        expected = build(plan[name])
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if type(module) is not type(expected) or shapes(module) != shapes(expected):
            raise ValueError(f"{name}: the model's {type(module).__name__} is not the plan's "
                             f"{type(expected).__name__} at rank {plan[name]['rank']}: save the compressed model "
                             f"(small = lowrank.compress(model, plan)) with the plan it was made from")
    if measure.params(model) != plan.params:
        raise ValueError(f"the model has {measure.params(model):,} parameters, the plan's compressed model "
                         f"{plan.params:,}: save the compressed model with the plan it was made from")
    torch.save({"plan": plan.to_json(), "state_dict": model.state_dict()}, path)


def load(path, model):
    """Rebuild a model saved by :func:`save` on top of the dense ``model`` (left untouched).

    Returns ``(compressed model, plan)``. Raises ``ValueError`` for a file :func:`save` did not
    write (a plain state_dict, say) and for a ``model`` the plan was not made for.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(saved, dict) and isinstance(saved.get("plan"), str) and "state_dict" in saved):
        raise ValueError(f"{path} was not written by lowrank.save (it holds no plan): a plain state_dict loads "
                         f"with model.load_state_dict(torch.load(path)); save a compressed model with "
                         f"lowrank.save(path, small, plan)")
    plan = Plan.from_json(saved["plan"])
    new = structure(model, plan)
    new.load_state_dict(saved["state_dict"])
    return new, plan
