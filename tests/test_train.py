import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowrank.train import History, distillation_loss, fit


def separable(n=256, d=8, classes=3, seed=0):
    """Points labelled by the nearest of ``classes`` well-separated centres: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, d, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    x = centres[y] + 0.5 * torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def mlp(d=8, classes=3, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, classes))


def kl(teacher, student, x, T=4.0):
    """Mean KL(softmax(teacher/T) ‖ softmax(student/T)) over the rows of x, written out."""
    with torch.no_grad():
        p = torch.softmax(teacher(x) / T, 1)
        q = torch.softmax(student(x) / T, 1)
        return (p * (p.log() - q.log())).sum(1).mean().item()


def same_weights(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_loss_falls_and_accuracy_rises():
    train, test = separable(seed=0), separable(seed=0, n=128)
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    history = fit(model, train, epochs=5, lr=0.05, batch_size=32, eval_data=test, progress=False)
    assert isinstance(history, History)
    assert len(history.loss) == len(history.train_accuracy) == len(history.accuracy) == 5
    assert len(history.seconds) == 5
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert history.train_accuracy[-1] > history.train_accuracy[0]
    assert history.accuracy[-1] > 0.95
    assert not model.training


def test_trains_in_place():
    model = mlp()
    before = copy.deepcopy(model)
    fit(model, separable(), epochs=1, progress=False)
    assert not same_weights(model, before)


def test_same_seed_same_history_and_weights():
    # dropout draws from the global generator: the seed must cover it as well as the shuffling
    data, start = separable(), mlp(dropout=0.5)
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(start)
        history = fit(model, data, epochs=3, lr=0.05, batch_size=32, seed=seed, progress=False)
        runs.append((model, history))
    (a, ha), (b, hb), (c, hc) = runs
    assert ha.loss == hb.loss and ha.train_accuracy == hb.train_accuracy
    assert same_weights(a, b)
    assert ha.loss != hc.loss and not same_weights(a, c)


def test_eval_data_does_not_change_the_training():
    """Measuring accuracy between epochs must not consume the random stream that dropout (and
    augmentation) draw from: the same seed gives the same weights with or without eval_data."""
    data, start = separable(), mlp(dropout=0.5)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    fit(a, data, epochs=3, lr=0.05, batch_size=32, progress=False)
    fit(b, data, epochs=3, lr=0.05, batch_size=32, eval_data=separable(n=64, seed=1), progress=False)
    assert same_weights(a, b)


def test_distillation_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(4, (5,), generator=g)
    T, alpha = 3.0, 0.3
    p, q = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kl_pq = (p * (p.log() - q.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    expected = (1 - alpha) * ce + alpha * T**2 * kl_pq
    torch.testing.assert_close(distillation_loss(s, t, y, alpha, T), expected)
    torch.testing.assert_close(distillation_loss(s, s, y, 1.0, T), torch.tensor(0.0))


def test_first_epoch_loss_is_the_loss_of_the_starting_model():
    # one full batch, one step: the recorded loss is the loss before the step
    data, student, teacher = separable(n=64), mlp(seed=1), mlp(seed=2)
    x, y = data.tensors
    with torch.no_grad():
        expected = distillation_loss(student(x), teacher(x), y, 0.7, 2.0).item()
    history = fit(student, data, epochs=1, batch_size=64, teacher=teacher, alpha=0.7,
                  temperature=2.0, progress=False)
    assert history.loss[0] == pytest.approx(expected, rel=1e-5)


def test_distillation_moves_student_to_teacher_and_leaves_teacher_alone():
    data = separable()
    x = data.tensors[0]
    teacher, student = mlp(seed=1), mlp(seed=2)
    teacher.train()
    saved = copy.deepcopy(teacher.state_dict())
    gap = kl(teacher, student, x)
    fit(student, data, epochs=5, lr=0.05, batch_size=32, teacher=teacher, alpha=1.0, progress=False)
    assert kl(teacher, student, x) < 0.2 * gap
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in saved.items())
    assert teacher.training and all(p.grad is None for p in teacher.parameters())


def test_alpha_one_ignores_labels_alpha_zero_ignores_teacher():
    data, teacher, start = separable(), mlp(seed=1), mlp(seed=2)
    x, y = data.tensors
    shuffled = TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))])
    runs = {}
    for name, d, t, alpha in [("soft", data, teacher, 1.0), ("soft, other labels", shuffled, teacher, 1.0),
                              ("hard", data, teacher, 0.0), ("no teacher", data, None, 0.5)]:
        runs[name] = copy.deepcopy(start)
        fit(runs[name], d, epochs=2, batch_size=32, teacher=t, alpha=alpha, progress=False)
    assert same_weights(runs["soft"], runs["soft, other labels"])
    torch.testing.assert_close(runs["hard"].state_dict(), runs["no teacher"].state_dict())
    assert not same_weights(runs["soft"], runs["hard"])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(monkeypatch, schedule):
    seen, step = [], torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    fit(mlp(), separable(n=64), epochs=3, lr=0.1, batch_size=16, schedule=schedule, progress=False)
    steps = 3 * 4
    k = torch.arange(steps, dtype=torch.float64)
    expected = 0.05 * (1 + torch.cos(torch.pi * k / steps)) if schedule == "cosine" else 0.1 + 0 * k
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), expected)


def test_dataloader_and_zero_epochs():
    data = separable(n=64)
    model = mlp()
    history = fit(model, DataLoader(data, batch_size=16), epochs=2, schedule="constant", progress=False)
    assert len(history.loss) == 2 and history.accuracy == []
    before = copy.deepcopy(model)
    assert fit(model, data, epochs=0, progress=False) == History()
    assert same_weights(model, before)


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(epochs=1.5), dict(lr=0), dict(lr=-0.1),
                                 dict(alpha=-0.1), dict(alpha=1.5), dict(temperature=0),
                                 dict(schedule="step"), dict(batch_size=0)])
def test_bad_arguments(bad):
    arguments = dict(epochs=1, progress=False) | bad
    with pytest.raises(ValueError):
        fit(mlp(), separable(n=16), **arguments)


def test_bad_data_and_teacher():
    model = mlp()
    with pytest.raises(ValueError, match="empty"):
        fit(model, TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), 1, progress=False)
    with pytest.raises(ValueError, match="separate"):
        fit(model, separable(n=16), 1, teacher=model, progress=False)


def test_non_finite_loss_raises():
    x, y = separable(n=64).tensors
    x[5, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        fit(mlp(), TensorDataset(x, y), epochs=1, progress=False)


def test_finetune_pretrained_resnet20_on_real_cifar10():
    from lowrank import data, models

    model = models.resnet20(pretrained=True)
    teacher = copy.deepcopy(model)
    saved = copy.deepcopy(teacher.state_dict())
    train = data.cifar10("train", limit=256, augment=True)
    history = fit(model, train, epochs=1, lr=1e-3, batch_size=128, teacher=teacher, progress=False)
    assert len(history.loss) == 1 and torch.isfinite(torch.tensor(history.loss[0]))
    # a pretrained model already fits its training images: self-distillation starts near zero KL
    assert history.train_accuracy[0] > 0.8
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in saved.items())


def test_channels_last_trains_the_same_and_returns_the_default_layout():
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())

    def conv_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))

    teacher = conv_net()
    a, b = conv_net(), conv_net()
    ha = fit(a, data, epochs=2, batch_size=32, teacher=teacher, channels_last=True, progress=False)
    hb = fit(b, data, epochs=2, batch_size=32, teacher=teacher, channels_last=False, progress=False)
    assert ha.loss == pytest.approx(hb.loss, rel=1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        assert p.is_contiguous()
    assert teacher[0].weight.is_contiguous()     # the teacher itself never changed layout
