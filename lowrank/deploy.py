"""From MACs to milliseconds: make a network fast on the machine at hand, and measure what each
of its layers costs there.

Each transform returns a NEW model that computes the same function in eval mode (up to float
rounding); the model passed in is never modified:

- :func:`fold_bn` (from :mod:`lowrank.batchnorm`): every BatchNorm into the conv before it;
- :func:`merge`: inside each factorized layer, multiply adjacent factors back into one conv where
  that pays (fewer MACs, or less measured time given :class:`LayerTimes`);
- :func:`channels_last`: 4-D weights in the NHWC memory layout that the CPU kernels prefer;
- :func:`optimize`: the three in turn; :func:`export_onnx` and :class:`OnnxModel`: the model in
  ONNX Runtime, callable like a module.

Measured latency: :class:`LayerTimes` times layers on this machine (interleaved rounds, medians)
under stated conditions (batch size, threads, clock, layout) and caches the times per machine in
the user cache; :func:`latency_table` times a plan's layers, dense and over candidate ranks, for
the rank rule ``lowrank.ranks.budget(fraction, by="latency", table=...)``.
"""
import contextlib
import copy
import hashlib
import io
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import measure
from .batchnorm import _conv_bn_pairs, _set, fold_bn
from .plans import FACTORIZED, Layer, Plan, _probe, build, check_model
from .storage import cache_root
from .surgery import structure

__all__ = ["fold_bn", "merge", "forms", "describe", "channels_last", "optimize", "retain_memory", "export_onnx",
           "OnnxModel", "LayerTimes", "LatencyTable", "latency_table", "RANKS"]

#: candidate ranks of a latency table, as fractions of each layer's full rank(s)
RANKS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


# --- Merging factors --------------------------------------------------------------------------

def _pointwise(c) -> bool:
    return (type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.stride == (1, 1)
            and c.padding == (0, 0) and c.groups == 1)


def _depthwise(c) -> bool:
    return type(c) is nn.Conv2d and c.groups == c.in_channels == c.out_channels > 1


def _mergeable(a, b) -> bool:
    """Whether ``b(a(x))`` is one layer of the same kind: two linears; a conv followed by a 1×1
    conv; a 1×1 conv followed by a conv (when ``a`` has no bias, or ``b`` no zero padding, which
    would pad zeros where ``a`` would give its bias); a depthwise kh×1 conv then a depthwise 1×kw."""
    if type(a) is nn.Linear and type(b) is nn.Linear:
        return True
    if type(a) is not nn.Conv2d or type(b) is not nn.Conv2d or isinstance(a.padding, str) or isinstance(
            b.padding, str):
        return False
    if _pointwise(b) and a.groups == 1:
        return True
    if _pointwise(a) and b.groups == 1:
        return a.bias is None or b.padding == (0, 0) or b.padding_mode != "zeros"
    return (_depthwise(a) and _depthwise(b) and a.out_channels == b.in_channels and a.bias is None
            and a.kernel_size[1] == 1 and a.stride[1] == 1 and a.padding[1] == 0
            and b.kernel_size[0] == 1 and b.stride[0] == 1 and b.padding[0] == 0
            and a.padding_mode == b.padding_mode)


def _merged(a, b):
    """The one layer equal to ``b(a(x))`` (see :func:`_mergeable`), computed in float64."""
    like = a.weight
    A, B = a.weight.detach().double(), b.weight.detach().double()
    bias = None if b.bias is None else b.bias.detach().double()
    with torch.device(like.device):
        if type(a) is nn.Linear:
            new = nn.Linear(a.in_features, b.out_features, bias=a.bias is not None or b.bias is not None)
            W = B @ A
            if a.bias is not None:
                bias = B @ a.bias.detach().double() + (0 if bias is None else bias)
        elif _pointwise(b) and a.groups == 1:
            new = nn.Conv2d(a.in_channels, b.out_channels, a.kernel_size, a.stride, a.padding, a.dilation,
                            bias=a.bias is not None or b.bias is not None, padding_mode=a.padding_mode)
            W = torch.einsum("tr,rskl->tskl", B[:, :, 0, 0], A)
            if a.bias is not None:
                bias = B[:, :, 0, 0] @ a.bias.detach().double() + (0 if bias is None else bias)
        elif _pointwise(a):
            new = nn.Conv2d(a.in_channels, b.out_channels, b.kernel_size, b.stride, b.padding, b.dilation,
                            bias=a.bias is not None or b.bias is not None, padding_mode=b.padding_mode)
            W = torch.einsum("trkl,rs->tskl", B, A[:, :, 0, 0])
            if a.bias is not None:
                bias = B.sum((2, 3)) @ a.bias.detach().double() + (0 if bias is None else bias)
        else:  # depthwise kh×1 then depthwise 1×kw: one depthwise kh×kw with the outer-product kernel
            new = nn.Conv2d(a.in_channels, b.out_channels, (a.kernel_size[0], b.kernel_size[1]),
                            (a.stride[0], b.stride[1]), (a.padding[0], b.padding[1]),
                            (a.dilation[0], b.dilation[1]), groups=a.groups, bias=b.bias is not None,
                            padding_mode=a.padding_mode)
            W = A * B
    with torch.no_grad():
        new.weight.copy_(W.to(like.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(like.dtype))
    return new.to(like.dtype).train(b.training)


def forms(layer: nn.Module) -> list:
    """Every exact form of a factorized layer (a chain of convs or linears): the layer itself
    first, then each way of merging runs of adjacent factors (:func:`_mergeable`), as a new
    ``nn.Sequential`` of plain layers (a single layer when everything merges). A Tucker-2 layer has
    four: its three convs, the first 1×1 merged into the core, the last merged into it, and the
    dense conv. Any other module: ``[layer]``."""
    if not isinstance(layer, FACTORIZED):
        return [layer]
    parts = list(layer)
    result = [layer]
    for cuts in itertools.product([False, True], repeat=len(parts) - 1):   # True: merge at the boundary
        if not any(cuts):
            continue
        chain = [parts[0]]
        for part, join in zip(parts[1:], cuts):
            if join:
                if not _mergeable(chain[-1], part):
                    break
                chain[-1] = _merged(chain[-1], part)
            else:
                chain.append(part)
        else:
            result.append(chain[0] if len(chain) == 1 else nn.Sequential(*chain))
    return result


def describe(module: nn.Module) -> str:
    """A short description of a layer or chain of layers, e.g. ``"1×1 64→16 · 3×3 16→64"``."""
    parts = []
    for m in (module if isinstance(module, nn.Sequential) else [module]):
        if isinstance(m, nn.Conv2d):
            dw = " dw" if m.groups > 1 else ""
            stride = f" /{m.stride[0]}" if max(m.stride) > 1 else ""
            parts.append(f"{m.kernel_size[0]}×{m.kernel_size[1]}{dw} {m.in_channels}→{m.out_channels}{stride}")
        elif isinstance(m, nn.Linear):
            parts.append(f"linear {m.in_features}→{m.out_features}")
        else:
            parts.append(type(m).__name__)
    return " · ".join(parts)


def merge(model: nn.Module, times: "LayerTimes | None" = None, input_size=(3, 32, 32)) -> nn.Module:
    """A NEW model in which every factorized layer takes the cheapest of its :func:`forms`: the
    fewest MACs (ties: the fewest layers), or with ``times`` the least time measured on this
    machine. ``input_size``: one input of the model (without batch). Exact up to rounding; a layer
    whose own form is cheapest stays as it is. Returns the new model in eval mode."""
    check_model(model)
    new = copy.deepcopy(model).eval()
    sizes = _probe(new, input_size, FACTORIZED)[0]   # the input of each factorized layer
    for name, size in sizes.items():
        options = forms(new.get_submodule(name))
        if times is None:
            cost = [(measure.macs(f, size), len(list(f.children())) or 1) for f in options]
        else:
            cost = times.measure(options, size)
        best = min(range(len(options)), key=lambda i: cost[i])
        if best:
            _set(new, name, options[best])
    return new


def channels_last(model: nn.Module) -> nn.Module:
    """A NEW model whose 4-D weights are in the channels-last (NHWC) memory layout; its outputs
    are the same. The CPU convolutions of PyTorch (oneDNN) prefer it; an NCHW input is converted by
    the first conv."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def optimize(model: nn.Module, times: "LayerTimes | None" = None, input_size=(3, 32, 32),
             layout: str = "channels_last") -> nn.Module:
    """A NEW model for inference, in eval mode: BatchNorm folded into the convs before it (where
    there are such pairs, :func:`fold_bn`), factors merged where that pays (:func:`merge`, with
    ``times`` by measured time), and weights channels-last (``layout="contiguous"`` keeps NCHW).
    Equal to ``model`` in eval mode up to rounding."""
    if layout not in ("channels_last", "contiguous"):
        raise ValueError(f"layout must be 'channels_last' or 'contiguous', got {layout!r}")
    check_model(model)
    new = copy.deepcopy(model).eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in new.modules()) and _conv_bn_pairs(new):
        new = fold_bn(new)
    new = merge(new, times, input_size)
    return channels_last(new).eval() if layout == "channels_last" else new


def retain_memory(keep: bool = True) -> bool:
    """Ask glibc's allocator (``mallopt``) to keep freed memory in THIS process, from now on:
    freed memory goes back to the system only beyond 1 GiB, and blocks below 32 MiB (glibc's
    largest setting) come from the heap. ``keep=False`` sets glibc's start-up values instead
    (128 KiB for both: every larger block comes from, and goes back to, the system), which glibc
    otherwise raises as a process runs, by an amount that depends on what it has freed.

    With memory given back, the next activation of the same size lands on fresh pages, whose
    first touch costs a page fault each: on a CPU the network then spends part of its time in the
    kernel zeroing pages, whatever its MACs. Allocators that keep their memory (jemalloc,
    TCMalloc, which PyTorch's CPU tuning guide recommends) avoid it too. Returns ``True`` where
    it took effect (Linux with glibc), ``False`` elsewhere.
    """
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    trim, mmap = (1 << 30, 32 << 20) if keep else (128 << 10, 128 << 10)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_TRIM_THRESHOLD, trim) and libc.mallopt(M_MMAP_THRESHOLD, mmap))
    except (OSError, AttributeError, TypeError):
        return False


# --- ONNX Runtime -----------------------------------------------------------------------------

def export_onnx(model: nn.Module, path, input_size=(3, 32, 32)) -> Path:
    """Write ``model`` (in eval mode; ``model`` itself is untouched) to ``path`` as ONNX, with a
    dynamic batch dimension, by ``torch.onnx.export`` (the ``torch.export``-based exporter).
    The input is named ``"input"``, the output ``"output"``. Returns the path."""
    check_model(model)
    path = Path(path)
    model = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    x = measure.zeros(model, input_size, batch_size=2)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")   # the exporter's notes on its own internals
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return path


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime's CPU provider, callable like a module: ``forward`` takes
    a float tensor [N, ...] and returns a tensor, so :func:`lowrank.measure.latency` and
    :func:`lowrank.measure.accuracy` work on it. ``threads``: ONNX Runtime's intra-op threads
    (one inter-op thread); all graph optimisations on. Has no parameters and no gradient."""

    def __init__(self, path, threads: int = 1):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("OnnxModel runs ONNX files with onnxruntime: pip install onnxruntime "
                              "(or the package's deploy extra, pip install 'lowrank[deploy]')") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.path, self.threads = str(path), int(threads)
        self.session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x):
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])

    def __deepcopy__(self, memo):
        return OnnxModel(self.path, self.threads)

    def extra_repr(self):
        return f"{self.path!r}, threads={self.threads}"


# --- Measured latency -------------------------------------------------------------------------

def _key(module: nn.Module, input_size) -> str:
    """What a layer's time depends on: its layers' configuration (not their values) and input."""
    leaves = [m for m in module.modules() if not list(m.children())] or [module]
    text = " · ".join(repr(m) for m in leaves) + f" on {tuple(input_size)}"
    return text if len(text) <= 400 else "sha1:" + hashlib.sha1(text.encode()).hexdigest()


class LayerTimes:
    """Forward times of layers on this machine, under fixed conditions, measured once and kept.

    ``batch_size``, ``threads`` and ``clock`` are those of :func:`lowrank.measure.latency`
    (``clock="cpu"``, the thread's CPU time, needs ``threads=1``; it is not inflated by other
    programs on a shared machine). ``layout``: the memory layout layers run in
    (``"channels_last"`` or ``"contiguous"``). Each time is the median over ``rounds`` rounds of
    the median of ``torch.utils.benchmark`` repeats (``min_run_time`` seconds); the layers timed
    together are interleaved within each round. Weights are random (time does not depend on
    their values), inputs random normal; no gradients.

    With ``cache=True`` the times are kept in a JSON file per machine in the user cache
    (``lowrank.storage.cache_root() / "latency"``, never in the data root), under the conditions,
    the processor and the torch version; ``refresh=True`` measures every layer anew.
    """

    def __init__(self, batch_size: int = 1, threads: int = 1, clock: str = "cpu", layout: str = "channels_last",
                 rounds: int = 3, min_run_time: float = 0.05, cache: bool = True, refresh: bool = False):
        if layout not in ("channels_last", "contiguous"):
            raise ValueError(f"layout must be 'channels_last' or 'contiguous', got {layout!r}")
        measure._timer(clock, threads, torch.device("cpu"))   # checks clock and threads
        self.batch_size, self.threads, self.clock, self.layout = int(batch_size), int(threads), clock, layout
        self.rounds, self.min_run_time, self.refresh = int(rounds), float(min_run_time), refresh
        self.conditions = (f"batch {self.batch_size}, {self.threads} thread{'s' * (self.threads > 1)}, "
                           f"{clock} clock, {layout}, float32, torch {torch.__version__}")
        slug = "".join(c if c.isalnum() else "-" for c in measure.machine()).strip("-")
        self.path = cache_root() / "latency" / f"{slug}.json" if cache else None
        self.seconds = {}
        if self.path is not None and self.path.is_file() and not refresh:
            self.seconds = dict(json.loads(self.path.read_text()).get(self.conditions, {}))
        self._fresh = set()

    def __repr__(self):
        return f"LayerTimes({self.conditions}; {measure.machine()}; {len(self.seconds)} layers timed)"

    def measure(self, modules: list, input_size, min_run_time: float | None = None, again: bool = False) -> list:
        """Seconds of each module (in eval mode, on a batch of ``batch_size`` inputs of
        ``input_size``, or of the sizes in a list of one size per module): cached ones looked up
        (``again=True``: none), the others measured together, interleaved (``min_run_time`` per
        timing, default the table's)."""
        one = not (isinstance(input_size, list) and input_size and isinstance(input_size[0], (list, tuple)))
        sizes = [input_size] * len(modules) if one else input_size
        keys = [_key(m, size) for m, size in zip(modules, sizes)]
        todo = {}
        for k, m, size in zip(keys, modules, sizes):
            if k not in todo and (again or k not in self.seconds or (self.refresh and k not in self._fresh)):
                todo[k] = (m, tuple(size))
        if todo:
            self._time(todo, min_run_time or self.min_run_time)
        return [self.seconds[k] for k in keys]

    def _time(self, todo: dict, min_run_time: float):
        fmt = torch.channels_last if self.layout == "channels_last" else torch.contiguous_format
        runs = {}
        for k, (m, size) in todo.items():
            x = torch.randn(self.batch_size, *size, generator=torch.Generator().manual_seed(0))
            m = copy.deepcopy(m).float().eval()
            if x.dim() == 4:
                x, m = x.contiguous(memory_format=fmt), m.to(memory_format=fmt)
            runs[k] = (m, x)
        timer = measure._timer(self.clock, self.threads, torch.device("cpu"))
        times = {k: [] for k in todo}
        with torch.no_grad():
            for m, x in runs.values():
                m(x)   # warm-up
            for _ in range(self.rounds):
                for k, (m, x) in runs.items():
                    t = measure.benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=self.threads,
                                                timer=timer).blocked_autorange(min_run_time=min_run_time)
                    times[k].append(t.median)
        for k, ts in times.items():
            self.seconds[k] = sorted(ts)[len(ts) // 2]
            self._fresh.add(k)
        self._save()

    def _save(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
        stored.setdefault(self.conditions, {}).update(self.seconds)
        stored["machine"] = measure.machine()
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=0, sort_keys=True))
        tmp.replace(self.path)


@dataclass
class LatencyTable:
    """Measured seconds of a model's layers, for :class:`lowrank.ranks.budget` with ``by="latency"``.

    ``layers``: layer name → ``{"method": ..., "dense": seconds, "ranks": {rank: seconds}}``
    (a rank is an int, or a pair (rT, rS) for Tucker-2; its time is that of its fastest form, see
    :func:`forms`). ``network``: seconds of the whole dense model. The time of the model with
    some layers changed is predicted as ``network + scale·Σ (new time − dense time)`` over the
    changed layers; ``scale`` corrects for layers running slower or faster inside the network
    than alone (1: purely additive). ``times``: the :class:`LayerTimes` that measured it (used to
    time ranks the table lacks), ``None`` for a table written by hand.
    """
    layers: dict
    network: float
    scale: float = 1.0
    conditions: str = ""
    times: LayerTimes | None = field(default=None, repr=False)

    def options(self, name: str, method: str) -> tuple[float, dict]:
        """``(dense seconds, {rank: seconds})`` of one layer; ``ValueError`` if it is not in the
        table or was measured for another method."""
        if name not in self.layers:
            raise ValueError(f"{name}: not in the latency table (it has {len(self.layers)} layers): measure it "
                             f"with lowrank.deploy.latency_table(model, plan, times) on a plan that includes it")
        row = self.layers[name]
        if row.get("method", method) != method:
            raise ValueError(f"{name}: the latency table timed {row['method']} factors, the plan asks for {method}: "
                             "measure the table with a plan of that method")
        return row["dense"], {(tuple(r) if isinstance(r, list) else r): s for r, s in row["ranks"].items()}

    def seconds(self, name: str, entry: dict) -> float:
        """Seconds of one layer as a plan entry has it (dense, or factorized at its rank; ranks
        the table lacks are measured with ``times`` and added)."""
        dense, ranks = self.options(name, entry["method"] if entry["method"] != "dense" else
                                    self.layers.get(name, {}).get("method"))
        if entry["method"] == "dense":
            return dense
        rank = tuple(entry["rank"]) if isinstance(entry["rank"], list) else entry["rank"]
        if rank not in ranks:
            if self.times is None:
                raise ValueError(f"{name}: rank {rank} is not in the latency table (a table written by hand "
                                 "cannot measure it)")
            self.layers[name]["ranks"][rank] = _fastest(self.times, entry, rank)
            return self.layers[name]["ranks"][rank]
        return ranks[rank]

    def calibrate(self, model: nn.Module, plan: Plan, input_size=(3, 32, 32)) -> "LatencyTable":
        """Measure with ``times``, side by side, the whole ``model`` after :func:`optimize`, dense
        and compressed by ``plan`` (random weights: time does not depend on them); set ``network``
        to the first, and ``scale`` so that :meth:`predict` gives the second for ``plan`` (1 if
        the plan changes nothing). Calibrating on the plan a budget gave, then allocating again,
        meets the budget more closely. Returns the table."""
        if self.times is None:
            raise ValueError("a table written by hand has no LayerTimes to measure with: set table.times")
        dense = optimize(model, input_size=input_size, layout=self.times.layout)
        if not plan.compressed():
            self.network, self.scale = self.times.measure([dense], input_size, 4 * self.times.min_run_time,
                                                          again=True)[0], 1.0
            return self
        small = structure(model, plan)
        for m in small.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        small = optimize(small, self.times, input_size, self.times.layout)
        self.network, measured = self.times.measure([dense, small], input_size, 4 * self.times.min_run_time,
                                                    again=True)
        changed = sum(self.seconds(n, plan[n]) - self.layers[n]["dense"] for n in plan.compressed())
        self.scale = (measured - self.network) / changed if changed < 0 else 1.0
        return self

    def predict(self, plan: Plan) -> float:
        """Predicted seconds of the model compressed by ``plan``, every layer in its fastest form."""
        return self.network + self.scale * sum(self.seconds(n, plan[n]) - self.options(n, plan[n]["method"])[0]
                                               for n in plan.compressed())


def _candidates(layer: Layer, fractions) -> list:
    """The candidate ranks of ``layer``: ``fractions`` of its full rank (each mode of Tucker-2),
    at least 1, those that save parameters, without repeats."""
    full = layer.full_rank()
    if full is None:
        raise ValueError(f"{layer.name}: method {layer.method!r} has no full rank to take fractions of "
                         "(latency tables support 'svd', 'spatial' and 'tucker2')")
    ranks = []
    for f in fractions:
        r = tuple(max(1, round(f * n)) for n in full) if isinstance(full, tuple) else max(1, round(f * full))
        if r not in ranks and layer.params(r) < layer.dense_cost()[0]:
            ranks.append(r)
    return ranks


def _deployed(entry: dict, rank=None):
    """The layer of a plan entry as it runs after :func:`optimize`: with a bias (BatchNorm folded),
    random weights; dense when ``rank`` is None."""
    e = {**entry, "config": {**entry["config"], "bias": True}}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if rank is None:
            return nn.Linear(**e["config"]) if e["type"] == "Linear" else nn.Conv2d(**e["config"])
        return build({**e, "rank": list(rank) if isinstance(rank, tuple) else rank}, device="cpu")


def _fastest(times: LayerTimes, entry: dict, rank) -> float:
    """Seconds of the fastest factorized form of a plan entry at ``rank`` (the dense form excluded)."""
    options = [f for f in forms(_deployed(entry, rank)) if isinstance(f, nn.Sequential)]
    return min(times.measure(options, entry["input"]))


def latency_table(model: nn.Module, plan: Plan, times: LayerTimes, fractions=RANKS, method: str | None = None,
                  input_size=(3, 32, 32)) -> LatencyTable:
    """Measure, with ``times``, every layer of ``plan`` (factorized or kept dense): dense, and
    factorized by ``method`` (default: the method of the plan's factorized convs) at the candidate
    ranks (``fractions`` of each layer's full rank, both modes of Tucker-2 alike; ranks that would
    save no parameters left out), each in its fastest exact form (:func:`forms`), all as after
    :func:`optimize` (with a bias: BatchNorm folded). Then :meth:`LatencyTable.calibrate` on
    ``plan``: the whole ``model``, dense and compressed by ``plan``, measured side by side, set the
    table's ``network`` and ``scale`` (how much of the layers' own saving the network shows).
    Returns the :class:`LatencyTable`."""
    plan.check(model)
    if method is None:
        methods = {e["method"] for e in plan.layers.values() if e["type"] == "Conv2d" and e["method"] != "dense"}
        if len(methods) != 1:
            raise ValueError(f"the plan factorizes its convs with {sorted(methods) or 'no method'}: say which "
                             "method to time (method='tucker2', say)")
        method = methods.pop()
    layers, modules = {}, dict(model.named_modules())
    for name, e in plan.items():
        layer = Layer(name, modules[name], "svd" if e["type"] == "Linear" else method, tuple(e["input"]))
        e = {**e, "method": layer.method}
        dense = times.measure([_deployed(e)], e["input"])[0]
        ranks = {r: _fastest(times, e, r) for r in _candidates(layer, fractions)}
        layers[name] = {"method": layer.method, "dense": dense, "ranks": ranks}
    table = LatencyTable(layers, 0.0, 1.0, times.conditions, times)
    return table.calibrate(model, plan, input_size)
