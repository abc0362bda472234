"""lowrank: compressing neural networks by low-rank decomposition — the package behind the book.

    import lowrank as lr
    model = lr.models.resnet20()
    plan = lr.plan(model, method="tucker2", ranks=0.5)
    small = lr.compress(model, plan)          # a new model; `model` is untouched
"""
from . import batchnorm, data, decompose, deploy, layers, measure, models, ranks, storage, train
from .batchnorm import fold_bn, recalibrate_bn
from .plans import Plan, plan
from .search import search
from .sequential import compress_sequential
from .stats import LayerStats, calibrate, load_stats, save_stats
from .surgery import compress, load, save, structure

__version__ = "0.1.0"
