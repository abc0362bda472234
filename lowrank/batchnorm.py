"""BatchNorm and compression: fold it into the convolution before it, or re-estimate its statistics.

A BatchNorm2d after a conv in eval mode is an affine map per output channel,
``y ↦ γ (y − μ) / √(v + ε) + β``; folding it gives one conv with ``W ← W·γ/√(v + ε)`` and
``b ← β + (b − μ)·γ/√(v + ε)`` (:func:`fold_bn`). Decomposing the folded conv weights each output
channel by the scale BatchNorm gives it. A compressed network's layers produce slightly different
activations, so the running statistics the dense network learnt no longer fit them;
:func:`recalibrate_bn` re-estimates them on unlabelled training images, the cheapest repair there is.
"""
import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .measure import _as_input
from .stats import _batches


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, BatchNorm2d name)`` for every BatchNorm2d whose only input is a Conv2d whose
    only user is that BatchNorm2d, found by tracing the forward pass with ``torch.fx``."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:
        raise ValueError(f"fold_bn traces the model with torch.fx to find which conv feeds which "
                         f"BatchNorm, and tracing failed ({type(error).__name__}: {error}); fold the "
                         "pairs by hand with torch.nn.utils.fusion.fuse_conv_bn_eval") from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and type(modules[source.target]) is nn.Conv2d and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


def _set(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_bn(model: nn.Module) -> nn.Module:
    """A NEW model in which every BatchNorm2d fed by a Conv2d alone (also the last conv of a
    factorized layer) is folded into that conv, which gains a bias, and replaced by ``nn.Identity``.

    The result equals ``model`` in eval mode (up to rounding); ``model`` is untouched. Raises
    ``ValueError`` when the model cannot be traced by ``torch.fx`` or has no such pair.
    """
    new = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(new)
    if not pairs:
        raise ValueError("the model has no BatchNorm2d fed directly by a Conv2d: nothing to fold")
    for conv_name, bn_name in pairs:
        conv, bn = new.get_submodule(conv_name), new.get_submodule(bn_name)
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        _set(new, bn_name, nn.Identity())
    for module in new.modules():          # a factorized layer whose last conv gained a bias
        if hasattr(module, "config") and isinstance(module, nn.Sequential):
            module.config = {**module.config, "bias": module[-1].bias is not None}
    return new.train(model.training)


def recalibrate_bn(model: nn.Module, data, limit: int | None = 1024, batch_size: int = 128) -> nn.Module:
    """A NEW model whose BatchNorm running means and variances are re-estimated on ``data``.

    ``data``: a Dataset of ``(x, y)`` pairs (labels unused), a DataLoader or a tensor of inputs
    [N, ...]; at most ``limit`` samples (``None``: all). Each BatchNorm's statistics become the
    average of its batch statistics over the data (``momentum=None``), computed without
    gradients; every weight is unchanged and ``model`` is untouched. The new model has
    ``model``'s train/eval flags. Raises ``ValueError`` for a model without BatchNorm or empty data.
    """
    new = copy.deepcopy(model)
    norms = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no BatchNorm layer to recalibrate")
    momenta = [bn.momentum for bn in norms]
    new.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    with torch.no_grad():
        for x in _batches(data, int(batch_size), limit):
            new(_as_input(x, new))
            seen += len(x)
    if seen == 0:
        raise ValueError("the data are empty")
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    for m, flag in zip(new.modules(), [m.training for m in model.modules()]):
        m.training = flag
    return new
