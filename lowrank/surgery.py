"""Model surgery: apply a plan to a model, and rebuild a compressed model from its plan."""
import copy

import torch
from tqdm.auto import tqdm

from .decompose.weighted import ridged
from .informed import factorize
from .plans import Plan, build, layer_class


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _dense(model, name, entry):
    """The module ``name`` of ``model``, checked against the plan's entry for it."""
    from .plans import Layer

    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the plan names a layer {name!r} that the model does not have") from None
    layer = Layer(name, module, entry["method"], tuple(entry["input"]))
    if layer.type != entry["type"] or layer.config != entry["config"]:
        raise ValueError(f"{name}: the model's {layer.type} {layer.config} does not match the plan's "
                         f"{entry['type']} {entry['config']}")
    return module


def compress(model, plan: Plan, stats=None, progress: bool = True, ridge: float = 1e-3, **options):
    """A NEW model in which every layer the plan factorizes is replaced by its factorized layer.

    ``model`` is left untouched. With a plan made with ``norm="data"``, ``stats`` (from
    :func:`lowrank.calibrate`) must hold the statistics of every factorized layer, and each layer
    minimises its output error plus ``ridge``-weighted weight error (Σ + δ I, see
    :func:`lowrank.decompose.weighted.ridged`). ``options`` go to the decomposition (e.g.
    ``n_iter_max`` for CP, ``n_iter`` for the Σ-weighted ALS).
    """
    if plan.norm == "data":
        missing = [n for n in plan.compressed() if stats is None or n not in stats]
        if missing:
            raise ValueError(f"a data-informed plan needs statistics for {missing[:3]}{'…' * (len(missing) > 3)}: "
                             f"pass stats=lowrank.calibrate(model, data)")
    new = copy.deepcopy(model)
    for name in tqdm(plan.compressed(), desc="compressing", disable=not progress, leave=False):
        entry = plan[name]
        dense = _dense(new, name, entry)
        rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
        if plan.norm == "data":
            layer = factorize(dense, entry, ridged(stats[name].sigma, ridge), **options)
        else:
            cls, extra = layer_class(entry)
            layer = cls.from_dense(dense, rank, **extra, **options)
        layer.train(dense.training)
        _replace(new, name, layer)
    return new


def structure(model, plan: Plan):
    """A copy of ``model`` with the plan's factorized layers in place, uninitialised (same device
    and dtype as the layers they replace): the architecture to load a compressed state_dict into."""
    new = copy.deepcopy(model)
    for name in plan.compressed():
        dense = _dense(new, name, plan[name])
        layer = build(plan[name], device=dense.weight.device).to(dense.weight.dtype)
        layer.train(dense.training)
        _replace(new, name, layer)
    return new


def save(path, model, plan: Plan):
    """Save a compressed model as its plan (JSON text) and its state_dict, no pickled code."""
    torch.save({"plan": plan.to_json(), "state_dict": model.state_dict()}, path)


def load(path, model):
    """Rebuild a model saved by :func:`save` on top of the dense ``model`` (left untouched).

    Returns ``(compressed model, plan)``.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    plan = Plan.from_json(saved["plan"])
    new = structure(model, plan)
    new.load_state_dict(saved["state_dict"])
    return new, plan
