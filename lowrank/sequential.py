"""Sequential data-informed compression: each layer is fitted to the inputs that the already
compressed layers before it produce.

:func:`lowrank.compress` with statistics from :func:`lowrank.calibrate` fits every layer to the
inputs x it had in the *original* network. Once the layers before it are compressed, a layer
receives x̂ ≠ x instead, and the errors add up with depth. Going through the layers in forward
order, each one can instead be fitted to reproduce the original layer's output from the input it
really gets,

    min over W̃ of  E‖W x − W̃ x̂‖²,

which corrects for the error upstream (the "asymmetric" reconstruction of Zhang et al., TPAMI
2016). :func:`lowrank.decompose.weighted.corrected_target` turns it into the Σ-weighted
decomposition of a corrected weight, so every data-informed method works unchanged.
"""
import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .decompose.weighted import corrected_target
from .informed import factorize
from .measure import _as_input, _eval
from .plans import Plan
from .stats import _batches, input_vectors
from .surgery import _dense, _replace


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it waits for is captured."""


def _input_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` (a submodule of ``model``) receives when ``model`` runs on ``x``; the forward
    pass stops at ``layer``, so layers after it cost nothing."""
    captured = []

    def hook(module, inputs):
        captured.append(inputs[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def _layer_inputs(model: nn.Module, names, batches) -> dict:
    """``{name: [input of that layer for each batch]}`` in the order the forward pass reaches the
    layers; each must run exactly once per pass."""
    inputs, seen = {}, set()

    def hook(name, args):
        if name in seen:
            raise ValueError(f"layer {name!r} runs more than once per forward pass; compress the model with "
                             "lowrank.compress(model, plan, stats=lowrank.calibrate(model, data)) instead")
        seen.add(name)
        inputs.setdefault(name, []).append(args[0])

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(n, a))
               for n in names]
    try:
        for x in batches:
            seen.clear()
            model(x)
    finally:
        for h in handles:
            h.remove()
    unreached = [n for n in names if n not in inputs]
    if unreached:
        raise RuntimeError(f"the forward pass never reached these layers: {unreached}")
    return inputs


def compress_sequential(model: nn.Module, plan: Plan, data, limit: int | None = 256,
                        batch_size: int = 128, ridge: float = 1e-3, progress: bool = True,
                        **options) -> nn.Module:
    """A NEW model in which the plan's layers are factorized one by one in forward order, each
    minimising ``E‖W x − W̃ x̂‖² + δ‖W − W̃‖²`` over the calibration ``data``: x the layer's input
    in ``model``, x̂ its input in the model compressed so far (see the module docstring and
    :func:`~lowrank.decompose.weighted.corrected_target` for ``ridge``).

    ``plan``: made with ``norm="data"``. ``data``: a Dataset of ``(x, y)`` pairs, a DataLoader or
    a tensor of inputs [N, ...], at most ``limit`` samples (``None``: all of them). Costs one
    forward pass of ``model`` over the data, whose inputs to the factorized layers are kept in
    memory (about 0.5 GB for ResNet-56 and 256 CIFAR images), then per factorized layer one pass
    of the new model that stops at that layer. ``options`` go to the ALS of Tucker-2 and CP.
    ``model`` is left untouched; the new model has its train/eval flags.

    Raises ``ValueError`` for a plan not made with ``norm="data"``, empty data, a layer that runs
    more than once per forward pass, or non-finite activations; ``RuntimeError`` for a planned
    layer the forward pass never reaches.
    """
    if not isinstance(plan, Plan) or plan.norm != "data":
        raise ValueError("sequential compression needs a plan made with lowrank.plan(..., norm='data')")
    batches = [_as_input(x, model) for x in _batches(data, int(batch_size), limit)]
    if not batches:
        raise ValueError("the calibration data is empty")
    new = copy.deepcopy(model)
    flags = {name: m.training for name, m in model.named_modules()}
    new.eval()
    with _eval(model), torch.no_grad():
        inputs = _layer_inputs(model, plan.compressed(), batches)
        for name in tqdm(list(inputs), desc="compress (sequential)", disable=not progress, leave=False):
            entry = plan[name]
            dense, original = _dense(new, name, entry), model.get_submodule(name)
            gram = cross = 0
            count = 0
            for x, x_original in zip(batches, inputs.pop(name)):
                X = input_vectors(original, x_original)
                X_hat = input_vectors(dense, _input_of(new, dense, x))
                G, K = X_hat.T @ X_hat, X.T @ X_hat            # in the activations' precision
                if not torch.isfinite(G.diagonal()).all():      # a NaN/inf in x̂ shows in its Σ x̂_i²
                    raise ValueError(f"layer {name!r}: its input in the compressed model holds NaN or "
                                     "infinite values")
                gram, cross = gram + G.double(), cross + K.double()
                count += X.shape[0]
            W = original.weight.detach()
            W_eff, Sigma = corrected_target(W.reshape(W.shape[0], -1), gram / count, cross / count, ridge)
            layer = factorize(dense, entry, Sigma, weight=W_eff.reshape(W.shape), **options)
            _replace(new, name, layer)
    for name, m in new.named_modules():   # the flags of model; a new layer's parts get the old layer's
        m.training = flags.get(name, flags.get(name.rpartition(".")[0], model.training))
    return new
