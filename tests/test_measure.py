import logging

import pytest
import torch
import torch.nn as nn

import lowrank as lr
from lowrank import measure


def test_macs_of_a_conv_follow_the_formula():
    conv = nn.Conv2d(6, 8, (3, 5), stride=2, padding=(1, 2))  # 16×16 → 8×8
    assert measure.macs(conv, (6, 16, 16)) == 8 * 8 * 8 * 6 * 3 * 5
    grouped = nn.Conv2d(6, 12, 3, padding=1, groups=3)
    assert measure.macs(grouped, (6, 10, 10)) == 12 * 10 * 10 * 2 * 3 * 3
    assert measure.macs(nn.Linear(20, 7), (20,)) == 140


def test_macs_of_resnet20():
    # 16·3·9·32² + 3 stages of 6 convs (one strided) + linear, counted by hand
    model = lr.models.resnet20()
    convs = 16 * 3 * 9 * 32**2 + 6 * 16 * 16 * 9 * 32**2 + (32 * 16 + 5 * 32 * 32) * 9 * 16**2 \
        + (64 * 32 + 5 * 64 * 64) * 9 * 8**2
    assert measure.macs(model) == convs + 64 * 10


def test_params_and_accuracy_on_a_known_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert measure.params(model) == 10
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [2.0, 3.0, 0, 0]])
    data = torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 0]))
    acc = measure.accuracy(model, data)
    assert acc == pytest.approx(2 / 3) and (acc.correct, acc.total) == (2, 3)


def test_accuracy_restores_training_mode_and_rejects_empty_data():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Dropout()).train()
    data = torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        measure.accuracy(model, data)
    assert model.training and model[2].training


def test_latency_states_its_conditions():
    result = measure.latency(nn.Linear(8, 8), batch_size=4, input_size=(8,), threads=1, min_run_time=0.05)
    assert result.seconds > 0 and result.batch_size == 4 and result.threads == 1
    assert "batch 4" in str(result) and "1 thread" in str(result)


def test_compare_is_paired_and_relative_to_the_first_model():
    model = lr.models.resnet20()
    data = lr.data.cifar10("test", limit=64)
    table = measure.compare({"a": model, "b": model}, data, latency_time=0)
    assert table["b"]["agreement"] == 1.0 and table["b"]["params ×"] == 1.0
    assert table["a"]["accuracy"] == measure.accuracy(model, data)
    assert "<table>" in table._repr_html_() and "agreement" in str(table)


def test_latency_reports_its_spread_and_machine():
    result = measure.latency(nn.Linear(8, 8), input_size=(8,), threads=1, min_run_time=0.05)
    assert result.iqr >= 0 and measure.machine() in str(result) and "IQR" in str(result)


def test_paired_difference_and_its_standard_error():
    a = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    d = measure.Paired.from_correct(a, b)
    assert (d.only_a, d.only_b, d.total) == (2, 1, 8) and d.difference == pytest.approx(1 / 8)
    # the standard deviation of the per-image differences a_i − b_i, divided by √n
    diffs = a.double() - b.double()
    assert d.se == pytest.approx(diffs.std(unbiased=False).item() / 8 ** 0.5)
    assert measure.Paired.from_correct(a, a).se == 0
    with pytest.raises(ValueError, match="same length"):
        measure.Paired.from_correct(a, b[:3])


def test_paired_compares_two_models_on_the_same_images():
    model = lr.models.resnet20()
    data = lr.data.cifar10("test", limit=64)
    d = measure.paired(model, model, data)
    assert d.difference == 0 and d.se == 0 and d.total == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is only logged without a GPU")
def test_no_cuda_runtime_line_is_filtered_and_nothing_else(tmp_path, monkeypatch):
    """With a CUDA toolkit but no GPU, torch.utils.benchmark's import of cpp_extension logs
    "No CUDA runtime is found" to stderr (it showed on the book's pages); lowrank.measure filters
    that one line at its logger, and lets every other warning through."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a toolkit folder: torch then logs the line
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(handler)
    try:
        assert cpp_extension._find_cuda_home() == str(tmp_path)
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another warning"]
