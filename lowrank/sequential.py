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
from .stats import _batches, patch_gram, patch_sum
from .surgery import _failed, _replace, prepare


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


class _Replay:
    """Replays the outputs of the modules that no longer change while the layers are compressed
    one by one, so that each step's forward pass only computes what follows the last change.

    :meth:`freeze` wraps the largest submodules that contain no layer still to compress: when
    such a module is called again, for the same batch and the same call in the pass, with inputs
    equal to last time's, it returns (a copy of) last time's output. Anything else (other
    inputs, keyword arguments, non-tensor inputs or outputs) runs the module as usual.
    """

    def __init__(self, model: nn.Module):
        self.model, self.cache, self.wrapped, self.calls, self.batch = model, {}, {}, {}, None

    def start(self, batch: int):
        """Call before each forward pass: which batch it runs on."""
        self.batch, self.calls = batch, {}

    def freeze(self, remaining):
        """Wrap the largest submodules holding none of the ``remaining`` layer names."""
        def frozen(name):   # the model itself ("") holds every remaining layer
            return name != "" and not any(r == name or r.startswith(name + ".") for r in remaining)

        roots = [n for n, _ in self.model.named_modules() if frozen(n) and not frozen(n.rpartition(".")[0])]
        self.release()
        self.cache = {n: self.cache.get(n, {}) for n in roots}
        for name in roots:
            module = self.model.get_submodule(name)
            self.wrapped[name] = (module, module.__dict__.get("forward"))
            module.forward = self._replaying(name, module.forward)

    def release(self):
        """Unwrap every module (the cache is kept)."""
        for module, own in self.wrapped.values():
            del module.forward
            if own is not None:
                module.forward = own
        self.wrapped = {}

    def _replaying(self, name, forward):
        def replaying(*args, **kwargs):
            call = self.calls[name] = self.calls.get(name, -1) + 1
            key = (self.batch, call)
            if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
                return forward(*args, **kwargs)
            seen = self.cache[name].get(key)
            if seen is not None and len(seen[0]) == len(args) and all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(args, seen[0])):
                return seen[1].clone()
            out = forward(*args)
            if isinstance(out, torch.Tensor):
                self.cache[name][key] = ([a.clone() for a in args], out.clone())
            return out
        return replaying


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
    memory (about 0.5 GB for ResNet-56 and 256 CIFAR images), then per factorized layer a pass
    of the new model that stops at that layer and replays the modules before the last change
    (about one forward pass of the new model in all). ``options`` go to the ALS of Tucker-2 and CP.
    ``model`` is left untouched; the new model has its train/eval flags.

    Raises ``ValueError`` for a plan not made with ``norm="data"`` or not made for ``model``, an
    option no layer of the plan takes (checked before any work), empty data, a layer that runs
    more than once per forward pass, or non-finite activations; ``RuntimeError`` for a planned
    layer the forward pass never reaches.
    """
    if not isinstance(plan, Plan) or plan.norm != "data":
        raise ValueError("sequential compression needs a plan made with lowrank.plan(..., norm='data')")
    per_layer = prepare(model, plan, options)
    batches = [_as_input(x, model) for x in _batches(data, int(batch_size), limit)]
    if not batches:
        raise ValueError("the calibration data is empty")
    new = copy.deepcopy(model)
    flags = {name: m.training for name, m in model.named_modules()}
    new.eval()
    replay = _Replay(new)
    with _eval(model), torch.no_grad():
        inputs = _layer_inputs(model, plan.compressed(), batches)
        names = list(inputs)
        for step, name in enumerate(tqdm(names, desc="compress (sequential)", disable=not progress, leave=False)):
            entry = plan[name]
            dense, original = new.get_submodule(name), model.get_submodule(name)
            gram = cross = 0
            count = 0
            try:
                replay.freeze(names[step:])
                x_hats = []
                for b, x in enumerate(batches):
                    replay.start(b)
                    x_hats.append(_input_of(new, dense, x))
            finally:
                replay.release()
            for x_hat, x_original in zip(x_hats, inputs.pop(name)):
                G, K = patch_gram(dense, x_hat), patch_gram(original, x_original, x_hat)  # X̂ᵀX̂, XᵀX̂
                if not torch.isfinite(G.diagonal()).all():      # a NaN/inf in x̂ shows in its Σ x̂_i²
                    raise ValueError(f"layer {name!r}: its input in the compressed model holds NaN or "
                                     "infinite values")
                gram, cross = gram + G.double(), cross + K.double()   # batch in float32, sums in float64
                count += patch_sum(original, x_original)[1]
            W = original.weight.detach()
            try:
                W_eff, Sigma = corrected_target(W.reshape(W.shape[0], -1), gram / count, cross / count, ridge)
                layer = factorize(dense, entry, Sigma, weight=W_eff.reshape(W.shape), **per_layer[name])
            except (ValueError, torch.linalg.LinAlgError) as error:
                raise _failed(name, entry, dense, error) from error
            _replace(new, name, layer)
    for name, m in new.named_modules():   # the flags of model; a new layer's parts get the old layer's
        m.training = flags.get(name, flags.get(name.rpartition(".")[0], model.training))
    return new
