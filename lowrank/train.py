"""Fine-tuning, with optional knowledge distillation from a teacher (Hinton et al. 2015).

A compressed model loses some accuracy; a few epochs of SGD usually win most of it back, and
more so when the original network acts as a teacher: the student then learns from the
teacher's softened class probabilities as well as from the labels.
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import trange


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
    return (1 - alpha) * F.cross_entropy(student, y) + alpha * kl


def fit(model, data, epochs, lr=0.01, batch_size=128, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="cosine", teacher=None, alpha=0.5, temperature=4.0,
        eval_data=None, seed=0, progress=True) -> History:
    """Train ``model`` IN PLACE with SGD and return its :class:`History`.

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
    - ``eval_data``: a Dataset; its top-1 accuracy is measured after every epoch.
    - ``seed``: seeds the shuffling (its own ``torch.Generator``) and, through
      ``torch.manual_seed``, the global generator that random augmentation and dropout draw
      from. On one device, two calls with the same seed, model and data give the same history
      and weights (on CUDA up to its non-deterministic kernels).
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
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("the model has no parameters to train")
    device, dtype = parameter.device, parameter.dtype

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if len(data) == 0:
        raise ValueError("the training data are empty")
    if isinstance(data, DataLoader):
        loader = data
    else:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                            num_workers=0)

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                nesterov=nesterov, weight_decay=weight_decay)
    steps = max(epochs * len(loader), 1)
    if schedule == "cosine":
        scale = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    else:
        scale = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)

    teacher_was_training = teacher.training if teacher is not None else False
    history = History()
    bar = trange(epochs, disable=not progress, desc="fit")
    try:
        if teacher is not None:
            teacher.eval()
        for epoch in bar:
            start = time.perf_counter()
            model.train()
            total_loss = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for x, y in loader:
                x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
                y = y.to(device)
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
            mean_loss = total_loss.item() / seen
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"the training loss became {mean_loss} in epoch {epoch}: lower lr")
            history.loss.append(mean_loss)
            history.train_accuracy.append(correct.item() / seen)
            postfix = {"loss": f"{mean_loss:.4f}", "train_acc": f"{history.train_accuracy[-1]:.3f}"}
            if eval_data is not None:
                history.accuracy.append(_accuracy(model, eval_data))
                postfix["acc"] = f"{history.accuracy[-1]:.3f}"
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(postfix)
    finally:
        bar.close()
        model.eval()
        if teacher is not None:
            teacher.train(teacher_was_training)
    return history


@torch.no_grad()
def _accuracy(model, data, batch_size=256) -> float:
    """Top-1 accuracy of ``model`` on a Dataset of ``(x, y)`` pairs, in eval mode."""
    model.eval()
    parameter = next(model.parameters())
    correct = torch.zeros((), device=parameter.device, dtype=torch.long)
    for x, y in DataLoader(data, batch_size=batch_size, num_workers=0):
        x = x.to(parameter.device, parameter.dtype) if x.is_floating_point() else x.to(parameter.device)
        correct += (model(x).argmax(1) == y.to(parameter.device)).sum()
    return correct.item() / len(data)
