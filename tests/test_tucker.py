import copy

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker, tucker
from tensorly.tenalg import mode_dot

from lowrank import models
from lowrank.layers import Tucker2Conv2d
from lowrank.decompose.tucker import (hooi, hosvd, left_singular_vectors, mode_product, relative_error,
                                      tucker2_reconstruct, unfold)


def random_weight(shape, seed=0, decay=0.0):
    """A float64 conv weight; ``decay`` > 0 gives channel spectra that fall off like real kernels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    if decay:
        W = W * torch.exp(-decay * torch.arange(shape[0], dtype=torch.float64))[:, None, None, None]
        W = W * torch.exp(-decay * torch.arange(shape[1], dtype=torch.float64))[None, :, None, None]
    return W


@pytest.fixture(scope="module")
def resnet56_weights():
    """The 3×3 conv weights of pretrained ResNet-56 (real weights), as float64."""
    model = models.resnet56(pretrained=True)
    return {name: m.weight.detach().double() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}


def error_of(W, decomposition):
    return relative_error(W, tucker2_reconstruct(*decomposition))


def test_unfold_and_mode_product_match_tensorly():
    W = random_weight((5, 4, 3, 2))
    M = torch.randn(6, 4, dtype=torch.float64)
    with tl.backend_context("numpy"):
        for mode in range(4):
            np.testing.assert_allclose(unfold(W, mode).numpy(), tl.base.unfold(W.numpy(), mode))
        np.testing.assert_allclose(mode_product(W, M, 1).numpy(), mode_dot(W.numpy(), M.numpy(), 1), atol=1e-12)


@pytest.mark.parametrize("shape,rank", [((12, 30), 5), ((30, 12), 5), ((30, 12), 12), ((30, 12), 20)])
def test_left_singular_vectors_match_the_svd(shape, rank):
    A = torch.randn(shape, dtype=torch.float64)                  # wide, tall, and rank beyond n
    U = left_singular_vectors(A, rank)
    assert U.shape == (shape[0], rank)
    assert torch.allclose(U.T @ U, torch.eye(rank, dtype=torch.float64), atol=1e-12)
    r = min(rank, min(shape))
    U_svd = torch.linalg.svd(A, full_matrices=False)[0][:, :r]
    assert torch.allclose(U_svd.T @ U @ U.T @ U_svd, torch.eye(r, dtype=torch.float64), atol=1e-10)  # spans them


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (5, 12, 3, 1), (16, 3, 3, 3)])
def test_full_rank_is_exact(shape):
    W = random_weight(shape)
    T, S = shape[:2]
    for decomposition in (hosvd(W, (T, S)), hooi(W, (T, S))):
        core, U_T, U_S = decomposition
        assert core.shape == (T, S) + shape[2:]
        assert torch.allclose(tucker2_reconstruct(core, U_T, U_S), W, atol=1e-10)


def test_hosvd_is_the_truncated_svd_of_the_unfoldings():
    # computed from the eigenvectors of the small Gram matrices, it is the textbook HOSVD
    W = random_weight((12, 10, 3, 3), seed=4, decay=0.1)
    core, U_T, U_S = hosvd(W, (5, 4))
    U_T_svd = torch.linalg.svd(unfold(W, 0), full_matrices=False).U[:, :5]
    U_S_svd = torch.linalg.svd(unfold(W, 1), full_matrices=False).U[:, :4]
    assert torch.allclose(U_T @ U_T.T, U_T_svd @ U_T_svd.T, atol=1e-10)
    assert torch.allclose(U_S @ U_S.T, U_S_svd @ U_S_svd.T, atol=1e-10)
    assert torch.allclose(tucker2_reconstruct(core, U_T, U_S),
                          tucker2_reconstruct(mode_product(mode_product(W, U_T_svd.T, 0), U_S_svd.T, 1),
                                              U_T_svd, U_S_svd), atol=1e-10)


def test_hooi_factors_are_orthonormal_and_keep_the_dtype():
    W = random_weight((20, 12, 3, 3)).float()
    core, U_T, U_S = hooi(W, (7, 5))
    assert core.dtype == U_T.dtype == U_S.dtype == torch.float32
    assert torch.allclose(U_T.T @ U_T, torch.eye(7), atol=1e-5)
    assert torch.allclose(U_S.T @ U_S, torch.eye(5), atol=1e-5)
    # orthonormal factors: ‖W − Ŵ‖² = ‖W‖² − ‖G‖²
    assert error_of(W, (core, U_T, U_S)) == pytest.approx(
        float((1 - core.square().sum() / W.square().sum()).sqrt()), rel=1e-3)


def test_hooi_without_sweeps_is_hosvd():
    W = random_weight((10, 9, 3, 3), decay=0.1)
    assert torch.allclose(tucker2_reconstruct(*hooi(W, (4, 3), n_iter=0)),
                          tucker2_reconstruct(*hosvd(W, (4, 3))), atol=1e-10)


@pytest.mark.parametrize("ranks", [(1, 1), (3, 5), (8, 2), (12, 11)])
def test_hooi_error_is_at_most_hosvd_and_falls_with_sweeps(ranks):
    W = random_weight((16, 12, 3, 3), seed=1, decay=0.05)
    errors = [error_of(W, hooi(W, ranks, n_iter=n, tol=0)) for n in (0, 1, 2, 5, 20)]
    assert errors[0] == pytest.approx(error_of(W, hosvd(W, ranks)), abs=1e-12)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]  # HOSVD is not a fixed point of HOOI on a random weight


def test_hooi_beats_hosvd_on_real_weights(resnet56_weights):
    for name in ("layer1.0.conv1", "layer2.3.conv2", "layer3.8.conv2"):
        W = resnet56_weights[name]
        ranks = (W.shape[0] // 2, W.shape[1] // 2)
        assert error_of(W, hooi(W, ranks)) < error_of(W, hosvd(W, ranks)) - 1e-4, name


@pytest.mark.parametrize("ranks", [(4, 3), (10, 6)])
def test_same_or_lower_error_than_tensorly(resnet56_weights, ranks):
    for W in (random_weight((24, 16, 3, 3), seed=2, decay=0.05), resnet56_weights["layer2.5.conv1"]):
        ours = error_of(W, hooi(W, ranks, n_iter=100, tol=1e-10))
        with tl.backend_context("numpy"):
            (core, (U_T, U_S)), _ = partial_tucker(W.numpy(), rank=list(ranks), modes=[0, 1],
                                                   n_iter_max=100, tol=1e-10)
            full = tucker(W.numpy(), rank=list(ranks) + list(W.shape[2:]), n_iter_max=100, tol=1e-10)
        theirs = relative_error(W, tucker2_reconstruct(*map(torch.from_numpy, (core, U_T, U_S))))
        theirs_full = relative_error(W, torch.from_numpy(tl.tucker_to_tensor(full)))
        assert ours <= theirs + 1e-9
        assert ours <= theirs_full + 1e-9


@pytest.mark.parametrize("decompose", [hosvd, hooi])
def test_bad_input_raises(decompose):
    W = random_weight((6, 5, 3, 3))
    for bad_weight in (W[0], W.reshape(6, 5, 9, 1, 1)):
        with pytest.raises(ValueError, match="4-D"):
            decompose(bad_weight, (2, 2))
    for ranks in [(0, 2), (2, 0), (7, 2), (2, 6), (1.5, 2)]:
        with pytest.raises(ValueError, match="rank"):
            decompose(W, ranks)
    W_nan = W.clone()
    W_nan[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decompose(W_nan, (2, 2))


def test_hooi_bad_options_raise():
    W = random_weight((6, 5, 3, 3))
    for options in ({"n_iter": -1}, {"n_iter": 2.5}, {"tol": -1e-3}, {"tol": float("nan")}):
        with pytest.raises(ValueError):
            hooi(W, (2, 2), **options)


def test_a_tensor_train_conv_is_a_tucker2_conv_and_hooi_fits_it_at_least_as_well(resnet20):
    """RENE's "TT" convolution (3 cores of W as T × kh·kw × S, ranks (r1, r2)) is the Tucker-2
    layer with core G1, U_T = G0, U_S = G2ᵀ: same three convs, same parameters. TensorLy's TT-SVD
    cores loaded into Tucker2Conv2d give the TT layer exactly; HOOI at the same ranks never fits
    the weight worse."""
    from tensorly.decomposition import tensor_train

    with tl.backend_context("pytorch"):
        for name in ["layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2"]:   # strides 1 and 2
            conv = copy.deepcopy(resnet20.get_submodule(name)).double()
            W = conv.weight.detach()
            T, S, kh, kw = W.shape
            for r1, r2 in [(T // 4, T // 4), (T // 2, S // 4)]:
                G0, G1, G2 = tensor_train(W.permute(0, 2, 3, 1).reshape(T, kh * kw, S), rank=[1, r1, r2, 1])
                W_tt = torch.einsum("ta,asb,bc->tsc", G0[0], G1, G2[:, :, 0]).reshape(T, kh, kw, S).permute(0, 3, 1, 2)
                core = G1.reshape(r1, kh, kw, r2).permute(0, 3, 1, 2)
                layer = Tucker2Conv2d.from_factors(conv, core, G0[0], G2[:, :, 0].T)
                x = torch.randn(4, S, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
                expected = torch.nn.functional.conv2d(x, W_tt, conv.bias, conv.stride, conv.padding)
                assert torch.allclose(layer(x), expected, atol=1e-10)
                assert sum(p.numel() for p in layer.parameters()) == T * r1 + r1 * r2 * kh * kw + r2 * S
                hooi_error = relative_error(W, Tucker2Conv2d.from_dense(conv, (r1, r2)).weight)
                assert hooi_error <= relative_error(W, W_tt) + 1e-12
