
import pytest
import torch
import torch.nn as nn

from lowrank.layers import (ChannelSVDConv2d, CPConv2d, LowRankLinear, SpatialSVDConv2d, Tucker2Conv2d,
                            conv_config)

torch.manual_seed(0)

CONV_SETTINGS = [  # (S, T, kernel, stride, padding, dilation, bias, padding_mode)
    (3, 8, 3, 1, 1, 1, True, "zeros"),
    (5, 7, (3, 5), (2, 1), (0, 2), 1, False, "zeros"),
    (4, 6, (5, 3), (1, 3), (2, 1), (2, 1), True, "zeros"),
    (6, 4, 3, 2, (1, 0), (1, 2), True, "reflect"),
    (2, 9, 1, 1, 0, 1, True, "zeros"),
    (4, 4, 3, 1, "same", 2, False, "zeros"),
]


def full_rank(cls, conv):
    T, S, kh, kw = conv.weight.shape
    return {ChannelSVDConv2d: min(T, S * kh * kw), SpatialSVDConv2d: min(S * kh, T * kw),
            Tucker2Conv2d: (T, S)}[cls]


@pytest.mark.parametrize("setting", CONV_SETTINGS)
@pytest.mark.parametrize("cls", [ChannelSVDConv2d, SpatialSVDConv2d, Tucker2Conv2d])
def test_full_rank_conv_factorizations_equal_the_dense_layer(cls, setting):
    S, T, k, stride, padding, dilation, bias, mode = setting
    conv = nn.Conv2d(S, T, k, stride, padding, dilation, bias=bias, padding_mode=mode).double()
    x = torch.randn(2, S, 13, 11, dtype=torch.double)
    layer = cls.from_dense(conv, full_rank(cls, conv))
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.weight, conv.weight)
    dense = layer.to_dense()
    torch.testing.assert_close(dense(x), conv(x))


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_equals_the_dense_layer(bias):
    linear = nn.Linear(12, 7, bias=bias).double()
    x = torch.randn(5, 12, dtype=torch.double)
    layer = LowRankLinear.from_dense(linear, 7)
    torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.to_dense()(x), linear(x))


@pytest.mark.parametrize("form", ["4way", "3way"])
@pytest.mark.parametrize("setting", CONV_SETTINGS[:4])
def test_cp_layer_is_exact_for_a_kernel_with_known_cp_factors(form, setting):
    S, T, k, stride, padding, dilation, bias, mode = setting
    conv = nn.Conv2d(S, T, k, stride, padding, dilation, bias=bias, padding_mode=mode).double()
    kh, kw = conv.kernel_size
    R = 5
    A_T, A_S, A_h, A_w = (torch.randn(n, R, dtype=torch.double) for n in (T, S, kh, kw))
    weights = torch.rand(R, dtype=torch.double) + 0.5
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("q,tq,sq,iq,jq->tsij", weights, A_T, A_S, A_h, A_w))
    spatial = [A_h, A_w] if form == "4way" else [torch.einsum("iq,jq->ijq", A_h, A_w).reshape(kh * kw, R)]
    layer = CPConv2d.from_factors(conv, weights, [A_T, A_S, *spatial], form)
    x = torch.randn(2, S, 12, 10, dtype=torch.double)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.to_dense()(x), conv(x))


def test_truncated_layers_are_the_eckart_young_optimum():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    for rank in (1, 4, 16):
        W = conv.weight.detach().reshape(16, -1)
        approx = ChannelSVDConv2d.from_dense(conv, rank).weight.detach().reshape(16, -1)
        s = torch.linalg.svdvals(W)
        assert torch.linalg.norm(W - approx) == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-4, abs=1e-5)


def test_tucker2_from_dense_is_hooi_and_at_least_as_good_as_tensorly():
    # The holdout layer where the HOSVD (the previous default) is 3.6 % above TensorLy's
    # partial_tucker: ResNet-44 layer2.0.conv1 at its 50 % ranks (18, 9). The default is HOOI
    # from the HOSVD (never worse than it); n_iter=0 is the HOSVD itself.
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    import lowrank as lr
    from lowrank.decompose.tucker import hosvd, relative_error, tucker2_reconstruct

    conv = lr.models.resnet44().get_submodule("layer2.0.conv1")
    W, ranks = conv.weight.detach().double(), (18, 9)
    with tl.backend_context("pytorch"):
        (core, (U_T, U_S)), _ = partial_tucker(W, rank=list(ranks), modes=[0, 1])   # its defaults
    theirs = relative_error(W, tucker2_reconstruct(core, U_T, U_S))
    ours = relative_error(W, Tucker2Conv2d.from_dense(conv, ranks).weight.double())
    plain = relative_error(W, Tucker2Conv2d.from_dense(conv, ranks, n_iter=0).weight.double())
    assert plain == pytest.approx(relative_error(W, tucker2_reconstruct(*hosvd(W, ranks))), rel=1e-5)
    assert ours <= theirs + 1e-6 and ours < plain - 0.01
    # reachable from a plan: compress passes n_iter/tol on to from_dense
    model = nn.Sequential(conv)
    plan = lr.plan(model, "tucker2", {"0": list(ranks)}, input_size=(16, 32, 32))
    for options, error in [({}, ours), ({"n_iter": 0}, plain)]:
        small = lr.compress(model, plan, progress=False, **options)
        assert relative_error(W, small[0].weight.double()) == pytest.approx(error, rel=1e-5)


def test_factorized_layers_do_not_modify_the_dense_layer():
    conv = nn.Conv2d(4, 6, 3)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    for cls in (ChannelSVDConv2d, SpatialSVDConv2d, Tucker2Conv2d):
        cls.from_dense(conv, 2)
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())


@pytest.mark.parametrize("cls, rank", [(ChannelSVDConv2d, 0), (ChannelSVDConv2d, 7), (SpatialSVDConv2d, 13),
                                       (Tucker2Conv2d, (7, 1)), (Tucker2Conv2d, (1, 0)), (ChannelSVDConv2d, 1.5)])
def test_rank_out_of_range_raises(cls, rank):
    conv = nn.Conv2d(4, 6, (3, 1))  # channel full rank 6, spatial min(12, 6) = 6, Tucker (6, 4)
    with pytest.raises(ValueError, match="rank"):
        cls.from_dense(conv, rank)


def test_unsupported_layers_and_non_finite_weights_raise():
    with pytest.raises(ValueError, match="groups"):
        ChannelSVDConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ValueError, match="Conv2d"):
        Tucker2Conv2d.from_dense(nn.Conv1d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="Linear"):
        LowRankLinear.from_dense(nn.Bilinear(3, 3, 3), 2)
    with pytest.raises(ValueError, match="asymmetric"):
        conv_config(nn.Conv2d(3, 3, 4, padding="same"))
    conv = nn.Conv2d(3, 3, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SpatialSVDConv2d.from_dense(conv, 2)
