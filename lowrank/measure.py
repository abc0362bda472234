"""Measuring a model: parameters, multiply–accumulates, latency, accuracy, and one table of all."""
import functools
import html
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, replace

import torch

# A CUDA build of PyTorch on a machine with a CUDA toolkit but no GPU logs "No CUDA runtime is
# found" when torch.utils.benchmark imports torch.utils.cpp_extension (readers saw it on every
# page that times a model). It says nothing about the CPU timings made here: drop that one line.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: "No CUDA runtime is found" not in record.getMessage())
from torch.utils import benchmark  # noqa: E402
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode


def params(model: torch.nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``, buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_input(x: torch.Tensor, model) -> torch.Tensor:
    """``x`` on ``model``'s device (CPU for a model without parameters), floating-point inputs in
    the model's floating-point dtype."""
    p = next(model.parameters(), None)
    if p is not None and x.is_floating_point() and p.dtype.is_floating_point:
        return x.to(p.device, p.dtype)
    return x.to(_device(model))


def zeros(model, input_size, batch_size: int = 1) -> torch.Tensor:
    """A batch of zeros [batch_size, *input_size] on ``model``'s device, in its floating-point dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.get_default_dtype() if p is None else p.dtype
    return torch.zeros(batch_size, *input_size, device=_device(model), dtype=dtype)


def macs(model: torch.nn.Module, input_size=(3, 32, 32)) -> int:
    """Multiply–accumulates of one forward pass on one input of shape ``input_size``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC in
    convolutions and matrix products; normalisation, activations and additions are not counted).
    """
    x = zeros(model, input_size)
    with _eval(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


class _eval:
    """Context manager: put ``model`` in eval mode, restore its training flags afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode


@functools.cache
def machine() -> str:
    """The processor this runs on and its core count, e.g. ``"AMD EPYC 7B13, 2 cores"``."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Latency:
    """Median wall time of one forward pass of a batch, with its spread (interquartile range of
    the timed blocks) and the conditions it was measured in. ``clock="cpu"``: the CPU time of the
    one thread that ran it instead (what a busy machine does not inflate, see :func:`latency`)."""
    seconds: float
    batch_size: int
    threads: int
    device: str
    iqr: float = float("nan")
    clock: str = "wall"

    def __str__(self):
        clock = ", thread CPU time" if self.clock == "cpu" else ""
        return (f"{self.seconds * 1e3:.2f} ms ± {self.iqr * 1e3 / 2:.2f} (half IQR; batch {self.batch_size}, "
                f"{self.threads} thread{'s' * (self.threads > 1)}{clock}, {self.device}: {machine()})")


def _timer(clock: str, threads: int, device):
    """The clock ``torch.utils.benchmark`` reads: wall time, or the calling thread's CPU time."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "wall":
        return time.perf_counter
    if threads != 1 or device.type != "cpu":
        raise ValueError(f"clock='cpu' times the one thread that runs the model, so it needs threads=1 on the "
                         f"CPU (got {threads} threads on {device}): use clock='wall'")
    return time.thread_time


def latency(model, batch_size: int = 1, input_size=(3, 32, 32), threads: int | None = None,
            min_run_time: float = 0.5, warmup: int = 3, clock: str = "wall") -> Latency:
    """Median forward time of ``model`` on a batch of zeros, via ``torch.utils.benchmark``.

    ``warmup`` untimed calls first, then ``Timer.blocked_autorange`` repeats for at least
    ``min_run_time`` seconds. ``threads`` defaults to ``torch.get_num_threads()``. ``clock``:
    ``"wall"`` (elapsed time), or ``"cpu"``, the CPU time of the calling thread (``threads=1`` on
    the CPU only): on a machine shared with other programs it leaves out the time spent waiting
    for a core, and on a quiet machine it equals the wall time. Returns a :class:`Latency`
    (median and interquartile range over the timed blocks).
    """
    threads = threads or torch.get_num_threads()
    device = _device(model)
    timer = _timer(clock, threads, device)
    x = zeros(model, input_size, batch_size)
    with _eval(model), torch.no_grad():
        for _ in range(warmup):
            model(x)
        measured = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads,
                                   timer=timer).blocked_autorange(min_run_time=min_run_time)
    return Latency(measured.median, batch_size, threads, str(device), measured.iqr, clock)


def latencies(models: dict, batch_size: int = 1, input_size=(3, 32, 32), threads: int | None = None,
              rounds: int = 5, min_run_time: float = 0.2, clock: str = "wall") -> dict:
    """Latencies of several models measured side by side: ``rounds`` rounds, each timing every
    model once in turn (:func:`latency`, ``min_run_time`` each), so that a change of machine load
    hits all of them alike. Returns ``{name: Latency}`` with the median over the rounds of each
    round's median, and the interquartile range over the rounds as its spread."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}")
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(latency(model, batch_size, input_size, threads, min_run_time, 1, clock))
    result = {}
    for name, measured in times.items():
        q = torch.tensor([m.seconds for m in measured], dtype=torch.float64).quantile(
            torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        result[name] = replace(measured[0], seconds=q[1], iqr=q[2] - q[0])
    return result


class Accuracy(float):
    """Top-1 accuracy as a float in [0, 1] that also carries ``correct`` and ``total``."""

    def __new__(cls, correct: int, total: int):
        value = super().__new__(cls, correct / total)
        value.correct, value.total = correct, total
        return value

    def __repr__(self):
        return f"{100 * self:.2f} % of {self.total:,} images"


def predictions(model, data, batch_size: int = 256):
    """Predicted and true class of every item of ``data`` (a Dataset of (x, y) or a DataLoader).

    Returns ``(predicted [N], labels [N])`` on the CPU; inputs are moved to the model's device.
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    device, predicted, truth = _device(model), [], []
    with _eval(model), torch.no_grad():
        for x, y in loader:
            predicted.append(model(x.to(device)).argmax(1).cpu())
            truth.append(torch.as_tensor(y))
    if not predicted:
        raise ValueError("the data set is empty")
    return torch.cat(predicted), torch.cat(truth)


def accuracy(model, data, batch_size: int = 256) -> Accuracy:
    """Top-1 accuracy of ``model`` on ``data`` (a Dataset of (x, y) or a DataLoader)."""
    predicted, truth = predictions(model, data, batch_size)
    return Accuracy(int((predicted == truth).sum()), len(truth))


@dataclass(frozen=True)
class Paired:
    """Accuracy of model a minus that of model b on the same images, with its standard error.

    ``difference`` and ``se`` are fractions (multiply by 100 for points); ``only_a``/``only_b``
    count the images that one model gets right and the other wrong, ``total`` the images. The
    standard error of a paired difference of proportions, √((n_a + n_b) − (n_a − n_b)²/n) / n,
    is far smaller than that of two independent accuracies when the models mostly agree.
    """
    difference: float
    se: float
    only_a: int
    only_b: int
    total: int

    @classmethod
    def from_correct(cls, a: torch.Tensor, b: torch.Tensor) -> "Paired":
        """From two boolean vectors [N]: which images each model classifies correctly."""
        a, b = torch.as_tensor(a, dtype=torch.bool), torch.as_tensor(b, dtype=torch.bool)
        if a.shape != b.shape or a.dim() != 1 or len(a) == 0:
            raise ValueError(f"expected two non-empty vectors of the same length, got {tuple(a.shape)}, "
                             f"{tuple(b.shape)}")
        n, only_a, only_b = len(a), int((a & ~b).sum()), int((b & ~a).sum())
        se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
        return cls((only_a - only_b) / n, se, only_a, only_b, n)

    def __str__(self):
        return (f"{100 * self.difference:+.2f} ± {100 * self.se:.2f} points (paired on {self.total:,} images; "
                f"{self.only_a} right only for a, {self.only_b} only for b)")


def paired(model_a, model_b, data, batch_size: int = 256) -> Paired:
    """Accuracy of ``model_a`` minus that of ``model_b`` on the same ``data``, with its paired
    standard error (:class:`Paired`): the comparison to assert claims with."""
    predicted_a, truth = predictions(model_a, data, batch_size)
    predicted_b, _ = predictions(model_b, data, batch_size)
    return Paired.from_correct(predicted_a == truth, predicted_b == truth)


class Table:
    """Rows of equal keys that print as text and render as HTML in a notebook."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __getitem__(self, name):
        return next(row for row in self.rows if row["model"] == name)

    def _cells(self):
        keys = list(self.rows[0])
        return keys, [[_format(row[k]) for k in keys] for row in self.rows]

    def __str__(self):
        keys, cells = self._cells()
        widths = [max(len(k), *(len(r[i]) for r in cells)) for i, k in enumerate(keys)]
        line = lambda items: "  ".join(s.rjust(w) if i else s.ljust(w)
                                       for i, (s, w) in enumerate(zip(items, widths)))
        return "\n".join([line(keys)] + [line(r) for r in cells])

    __repr__ = __str__

    def _repr_html_(self):
        keys, cells = self._cells()
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _format(value):
    if isinstance(value, Accuracy):
        return f"{100 * value:.2f} %"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def compare(models: dict, data=None, input_size=(3, 32, 32), batch_size: int = 1,
            latency_time: float = 0.3) -> Table:
    """One row per named model: parameters, MACs (and both as ratios of the first model),
    top-1 accuracy and agreement with the first model's predictions on ``data`` (paired, same
    images), and the median latency at ``batch_size`` (``latency_time=0`` skips it)."""
    rows, reference = [], None
    for name, model in models.items():
        row = {"model": name, "params": params(model), "MACs": macs(model, input_size)}
        if not rows:
            base = row
        row["params ×"] = base["params"] / row["params"]
        row["MACs ×"] = base["MACs"] / row["MACs"]
        if data is not None:
            predicted, truth = predictions(model, data)
            reference = predicted if reference is None else reference
            row["accuracy"] = Accuracy(int((predicted == truth).sum()), len(truth))
            row["agreement"] = Accuracy(int((predicted == reference).sum()), len(truth))
        if latency_time:
            row[f"latency b{batch_size} (ms)"] = latency(model, batch_size, input_size,
                                                         min_run_time=latency_time).seconds * 1e3
        rows.append(row)
    return Table(rows)
