"""Fine-tuning, with optional knowledge distillation from a teacher (Hinton et al. 2015).

A compressed model loses some accuracy; a few epochs of SGD usually win most of it back, and
more so when the original network acts as a teacher: the student then learns from the
teacher's softened class probabilities as well as from the labels.
"""
import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import trange

from .measure import _as_input, _eval, accuracy


@dataclass
class History:
    """What :func:`fit` measured, one entry per epoch.

    ``loss``: mean training loss; ``train_accuracy``: top-1 on the training batches as they were
    seen (train mode, while the weights moved); ``accuracy``: top-1 on ``eval_data`` after the
    epoch (eval mode), empty without ``eval_data``; ``seconds``: wall-clock time of the epoch.
    """
    loss: list = field(default_factory=list)
    train_accuracy: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    seconds: list = field(default_factory=list)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 4.0) -> torch.Tensor:
    """``(1 − α)·CE(student, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``.

    ``student``, ``teacher``: logits [N, C]; ``y``: labels [N]. Both terms are means over the
    batch. The factor T² keeps the gradient of the soft term the same size for any T.
    Returns a scalar.
    """
    T = temperature
    log_p = F.log_softmax(teacher / T, dim=1)
    log_q = F.log_softmax(student / T, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return (1 - alpha) * F.cross_entropy(student, y) + alpha * T**2 * kl


def fit(model, data, epochs=3, lr=0.01, batch_size=128, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="cosine", teacher=None, alpha=0.5, temperature=4.0,
        eval_data=None, seed=0, channels_last=True, progress=True) -> History:
    """Train ``model`` IN PLACE with SGD and return its :class:`History`.

    The defaults are the book's one fine-tuning recipe: 3 epochs of SGD (Nesterov momentum 0.9,
    weight decay 5e-4, batches of 128) with the learning rate 0.01 lowered along a cosine, and,
    given a ``teacher``, distillation with α = 0.5 and T = 4 (:func:`distillation_loss`); the
    book trains on ``lowrank.data.cifar10("train", augment=True)``.

    The weights of ``model`` are changed; keep a ``copy.deepcopy(model)`` first if you need the
    original (for example as the ``teacher``). On return ``model`` is in eval mode.

    - ``data``: a Dataset of ``(x, y)`` pairs, shuffled each epoch into batches of
      ``batch_size``; or a ``DataLoader``, used as it is (then ``batch_size`` and the seeded
      shuffling do not apply). Batches are moved to the model's device (and floating-point
      inputs to its dtype).
    - Optimiser: SGD with ``momentum``, ``nesterov`` and ``weight_decay`` on all parameters.
      ``schedule="cosine"`` lowers the learning rate from ``lr`` to 0 along a half cosine, one
      step per batch; ``"constant"`` keeps ``lr``.
    - ``teacher``: another model; the loss becomes :func:`distillation_loss` with ``alpha`` and
      ``temperature``. The teacher runs in eval mode without gradients and is never modified
      (its train/eval mode is restored on return). Without a teacher the loss is cross-entropy.
    - ``eval_data``: a Dataset (or DataLoader); its top-1 accuracy
      (:func:`lowrank.measure.accuracy`) is measured after every epoch.
    - ``seed``: seeds the shuffling (its own ``torch.Generator``) and, through
      ``torch.manual_seed``, the global generator that random augmentation and dropout draw
      from. On one device, two calls with the same seed, model and data give the same history
      and weights (on CUDA up to its non-deterministic kernels).
    - ``channels_last``: train 4-D inputs and conv weights in the channels-last memory layout
      (the same results up to rounding, about 1.5× faster on a CPU); ``model`` is returned in the default layout
      and the teacher is run from a channels-last copy, never changed.
    - ``progress``: a progress bar over epochs with the latest loss and accuracy.

    Raises ``ValueError`` for ``epochs < 0``, empty data, ``lr <= 0``, ``alpha`` outside
    [0, 1], ``temperature <= 0``, an unknown schedule, or ``teacher is model``; and
    ``FloatingPointError`` when the training loss stops being finite (lower ``lr``).
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if teacher is model:
        raise ValueError("the teacher must be a separate model: pass copy.deepcopy(model)")
    if next(model.parameters(), None) is None:
        raise ValueError("the model has no parameters to train")

    if len(data) == 0:
        raise ValueError("the training data are empty")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if isinstance(data, DataLoader):
        loader = data
    else:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                            num_workers=0)

    layout = torch.channels_last if channels_last else torch.contiguous_format
    if teacher is not None and channels_last:
        teacher = copy.deepcopy(teacher).to(memory_format=layout)
    model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                nesterov=nesterov, weight_decay=weight_decay)
    steps = max(epochs * len(loader), 1)

    def scale(step):
        """The learning rate of step ``step`` (0, 1, ..., steps − 1) as a fraction of ``lr``."""
        return 0.5 * (1 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)

    history = History()
    teacher_mode = _eval(teacher) if teacher is not None else nullcontext()
    with teacher_mode, trange(epochs, disable=not progress, desc="fit") as bar:
        for epoch in bar:
            start = time.perf_counter()
            loss, train_accuracy = _epoch(model, loader, optimizer, scheduler, teacher,
                                          alpha, temperature, layout)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} in epoch {epoch}: lower lr")
            history.loss.append(loss)
            history.train_accuracy.append(train_accuracy)
            postfix = {"loss": f"{loss:.4f}", "train_acc": f"{train_accuracy:.3f}"}
            if eval_data is not None:   # its DataLoader draws a seed: keep training's random stream
                with torch.random.fork_rng(devices=[]):
                    history.accuracy.append(float(accuracy(model, eval_data)))
                postfix["acc"] = f"{history.accuracy[-1]:.3f}"
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(postfix)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def _epoch(model, loader, optimizer, scheduler, teacher, alpha, temperature, layout):
    """One pass over ``loader`` in train mode, one optimiser and scheduler step per batch
    (4-D inputs in the memory ``layout``).

    Returns ``(mean loss, top-1 accuracy on the batches as they were seen)``.
    """
    parameter = next(model.parameters())
    model.train()
    total_loss = torch.zeros((), device=parameter.device)
    correct = torch.zeros((), device=parameter.device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        x = _as_input(x, model)
        if x.dim() == 4:
            x = x.contiguous(memory_format=layout)
        y = y.to(parameter.device)
        z = model(x)
        if teacher is None:
            loss = F.cross_entropy(z, y)
        else:
            with torch.no_grad():
                z_teacher = teacher(x)
            loss = distillation_loss(z, z_teacher, y, alpha, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (z.detach().argmax(1) == y).sum()
        seen += len(y)
    return total_loss.item() / seen, correct.item() / seen
