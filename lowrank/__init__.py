"""lowrank: compressing neural networks by low-rank decomposition — the package behind the book."""
from . import data, decompose, measure, models, storage

__version__ = "0.1.0"
