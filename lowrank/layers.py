"""Factorized layers: each replaces one dense layer by a chain of smaller ones.

Every class is an ``nn.Sequential`` of plain ``nn.Linear``/``nn.Conv2d`` modules (so a forward
pass is nothing but the chain), with
- ``from_dense(layer, rank)``: decompose a dense layer (input untouched), exact at full rank;
- ``from_factors(...)``: build from factors computed elsewhere (e.g. data-informed ones);
- ``weight``/``bias`` and ``to_dense()``: the equivalent dense layer.
The constructors take the dense layer's configuration, so a compressed model can be rebuilt
from its plan and loaded from a ``state_dict``.
"""
import torch
import torch.nn as nn

from .decompose.svd import channel_matrix, check_rank, spatial_matrix, truncated_svd
from .decompose.tucker import hooi


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv_config(conv: nn.Conv2d) -> dict:
    """The constructor arguments of ``conv`` as plain data (padding as a pair of ints).

    Raises ``ValueError`` for what the factorizations do not support: ``groups > 1``, and
    ``padding="same"`` that PyTorch would pad asymmetrically.
    """
    if conv.groups != 1:
        raise ValueError(grouped(conv))
    if type(conv) is not nn.Conv2d:
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch pads d·(k−1) in total, the odd one on the far side
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError("padding='same' with an even effective kernel pads asymmetrically; "
                                 "pad the input explicitly instead")
            padding = tuple(t // 2 for t in totals)
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=list(conv.kernel_size), stride=list(conv.stride), padding=list(padding),
                dilation=list(conv.dilation), bias=conv.bias is not None, padding_mode=conv.padding_mode)


def grouped(conv: nn.Conv2d) -> str:
    """Why a grouped conv (``groups > 1``) is not factorized: the message plans and errors give."""
    depthwise = " (this one is depthwise: a filter per input channel)" * (conv.groups == conv.in_channels)
    return f"grouped convolutions (groups={conv.groups}) are not supported{depthwise}"


def linear_config(linear: nn.Linear) -> dict:
    """The constructor arguments of ``linear`` as plain data."""
    if type(linear) is not nn.Linear:
        raise ValueError(f"expected an nn.Linear, got {type(linear).__name__}")
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)


def _checked(module, kind):
    config = conv_config(module) if kind is nn.Conv2d else linear_config(module)
    if not torch.isfinite(module.weight).all() or (module.bias is not None and not torch.isfinite(module.bias).all()):
        raise ValueError("the layer's weight or bias holds NaN or infinite entries")
    return config


def _split(U, s, Vh):
    """Balance singular values between the two factors: (U √s, √s Vh)."""
    root = s.sqrt()
    return U * root, root[:, None] * Vh


def _set(module, weight, like):
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape).to(like))


def _set_bias(module, bias):
    if bias is not None:
        with torch.no_grad():
            module.bias.copy_(bias)


class LowRankLinear(nn.Sequential):
    """``x ↦ A (B x) + b`` with B [r, n] (``first``) and A [m, r] (``second``): r(m + n) weights."""

    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.config = dict(in_features=in_features, out_features=out_features, bias=bias)
        self.rank = check_rank(rank, min(in_features, out_features))
        self.first = nn.Linear(in_features, self.rank, bias=False)
        self.second = nn.Linear(self.rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, linear, A, B):
        """``A`` [m, r] and ``B`` [r, n] with W ≈ A B; the bias is copied from ``linear``."""
        layer = cls(**linear_config(linear), rank=A.shape[1]).to(linear.weight)
        _set(layer.first, B, linear.weight)
        _set(layer.second, A, linear.weight)
        _set_bias(layer.second, linear.bias)
        return layer

    @classmethod
    def from_dense(cls, linear, rank):
        """Truncated SVD of ``linear.weight`` at ``rank``."""
        _checked(linear, nn.Linear)
        A, B = _split(*truncated_svd(linear.weight.detach().double(), rank))
        return cls.from_factors(linear, A, B)

    @property
    def weight(self):
        return self.second.weight @ self.first.weight

    @property
    def bias(self):
        return self.second.bias

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(**self.config).to(self.first.weight)
        _set(dense, self.weight, self.first.weight)
        _set_bias(dense, self.bias)
        return dense


class _FactorizedConv(nn.Sequential):
    """Shared by the conv factorizations: the dense config, ``bias`` and ``to_dense``."""

    def _init_config(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode):
        self.config = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=_pair(kernel_size),
                           stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), bias=bias,
                           padding_mode=padding_mode)
        return self.config

    @property
    def bias(self):
        return self[-1].bias

    def to_dense(self) -> nn.Conv2d:
        first = self[0].weight
        dense = nn.Conv2d(**self.config).to(first)
        _set(dense, self.weight, first)
        _set_bias(dense, self.bias)
        return dense


def _axis(c, axis):
    """Config of the one-axis part (``axis`` 0: kh×1, 1: 1×kw) of a conv's kernel, stride, padding, dilation."""
    pick = lambda pair, other: (pair[0], other) if axis == 0 else (other, pair[1])
    return dict(kernel_size=pick(c["kernel_size"], 1), stride=pick(c["stride"], 1),
                padding=pick(c["padding"], 0), dilation=pick(c["dilation"], 1), padding_mode=c["padding_mode"])


class ChannelSVDConv2d(_FactorizedConv):
    """Channel SVD: a kh×kw conv S→r (the original stride, padding, dilation), then a 1×1 conv r→T.

    W as a [T, S·kh·kw] matrix ≈ A [T, r] B [r, S·kh·kw].
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, padding_mode="zeros"):
        super().__init__()
        c = self._init_config(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        kh, kw = c["kernel_size"]
        self.rank = check_rank(rank, min(out_channels, in_channels * kh * kw))
        self.first = nn.Conv2d(in_channels, self.rank, c["kernel_size"], c["stride"], c["padding"], c["dilation"],
                               bias=False, padding_mode=padding_mode)
        self.second = nn.Conv2d(self.rank, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv, A, B):
        """``A`` [T, r], ``B`` [r, S·kh·kw] with W ≈ A B (as the channel matrix); bias copied."""
        layer = cls(**conv_config(conv), rank=A.shape[1]).to(conv.weight)
        _set(layer.first, B, conv.weight)
        _set(layer.second, A, conv.weight)
        _set_bias(layer.second, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv, rank):
        """Truncated SVD of the channel matrix of ``conv.weight`` at ``rank``."""
        _checked(conv, nn.Conv2d)
        return cls.from_factors(conv, *_split(*truncated_svd(channel_matrix(conv.weight.detach().double()), rank)))

    @property
    def weight(self):
        T, S, kh, kw = self.second.weight.shape[0], *self.first.weight.shape[1:]
        return (self.second.weight.flatten(1) @ self.first.weight.flatten(1)).reshape(T, S, kh, kw)


class SpatialSVDConv2d(_FactorizedConv):
    """Spatial SVD (Jaderberg et al. 2014): a kh×1 conv S→r, then a 1×kw conv r→T.

    The spatial matrix of W, [S·kh, T·kw], ≈ V [S·kh, r] H [r, T·kw]; stride, padding and
    dilation are split per axis.
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, padding_mode="zeros"):
        super().__init__()
        c = self._init_config(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        kh, kw = c["kernel_size"]
        self.rank = check_rank(rank, min(in_channels * kh, out_channels * kw))
        self.first = nn.Conv2d(in_channels, self.rank, bias=False, **_axis(c, 0))
        self.second = nn.Conv2d(self.rank, out_channels, bias=bias, **_axis(c, 1))

    @classmethod
    def from_factors(cls, conv, V, H):
        """``V`` [S·kh, r], ``H`` [r, T·kw] with spatial_matrix(W) ≈ V H; bias copied."""
        layer = cls(**conv_config(conv), rank=V.shape[1]).to(conv.weight)
        T, S, kh, kw = conv.weight.shape
        _set(layer.first, V.T.reshape(-1, S, kh, 1), conv.weight)
        _set(layer.second, H.reshape(-1, T, kw).permute(1, 0, 2), conv.weight)
        _set_bias(layer.second, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv, rank):
        """Truncated SVD of the spatial matrix of ``conv.weight`` at ``rank``."""
        _checked(conv, nn.Conv2d)
        return cls.from_factors(conv, *_split(*truncated_svd(spatial_matrix(conv.weight.detach().double()), rank)))

    @property
    def weight(self):
        first, second = self.first.weight[..., 0], self.second.weight[:, :, 0]  # [r, S, kh], [T, r, kw]
        return torch.einsum("qsi,tqj->tsij", first, second)


class Tucker2Conv2d(_FactorizedConv):
    """Tucker-2 (Kim et al. 2016): 1×1 conv S→rS (U_Sᵀ), kh×kw conv rS→rT (the core G, original
    stride, padding, dilation), 1×1 conv rT→T (U_T, original bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, padding_mode="zeros"):
        super().__init__()
        c = self._init_config(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        rT, rS = _pair(rank)
        self.rank = (check_rank(rT, out_channels, "output rank"), check_rank(rS, in_channels, "input rank"))
        self.first = nn.Conv2d(in_channels, rS, 1, bias=False)
        self.core = nn.Conv2d(rS, rT, c["kernel_size"], c["stride"], c["padding"], c["dilation"], bias=False,
                              padding_mode=padding_mode)
        self.last = nn.Conv2d(rT, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv, core, U_T, U_S):
        """core [rT, rS, kh, kw], U_T [T, rT], U_S [S, rS] with W ≈ core ×₁ U_T ×₂ U_S; bias copied."""
        layer = cls(**conv_config(conv), rank=(U_T.shape[1], U_S.shape[1])).to(conv.weight)
        _set(layer.first, U_S.T, conv.weight)
        _set(layer.core, core, conv.weight)
        _set(layer.last, U_T, conv.weight)
        _set_bias(layer.last, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv, rank, n_iter: int = 50, tol: float = 1e-8):
        """Tucker-2 of ``conv.weight`` at ``rank = (rT, rS)`` (an int means rT = rS) by HOOI in
        float64 (:func:`lowrank.decompose.tucker.hooi`): the HOSVD, refined by at most ``n_iter``
        sweeps until the relative error improves by less than ``tol``. Never worse than the HOSVD;
        ``n_iter=0`` gives the HOSVD itself."""
        _checked(conv, nn.Conv2d)
        return cls.from_factors(conv, *hooi(conv.weight.detach().double(), _pair(rank), n_iter, tol))

    @property
    def weight(self):
        return torch.einsum("tb,bakl,as->tskl", self.last.weight[:, :, 0, 0], self.core.weight,
                            self.first.weight[:, :, 0, 0])


class CPConv2d(_FactorizedConv):
    """CP (Lebedev et al. 2015). ``form="4way"``: 1×1 conv S→R, depthwise kh×1, depthwise 1×kw,
    1×1 conv R→T. ``form="3way"``: 1×1 conv S→R, depthwise kh×kw, 1×1 conv R→T.

    W[t, s, i, j] ≈ Σ_q λ_q A_T[t, q] A_S[s, q] A_h[i, q] A_w[j, q] (4-way; 3-way merges i, j).
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, padding_mode="zeros", form="4way"):
        super().__init__()
        c = self._init_config(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        if form not in ("4way", "3way"):
            raise ValueError(f"form must be '4way' or '3way', got {form!r}")
        self.form = form
        self.rank = check_rank(rank, 10**9)
        R = self.rank
        self.first = nn.Conv2d(in_channels, R, 1, bias=False)
        if form == "4way":
            self.vertical = nn.Conv2d(R, R, groups=R, bias=False, **_axis(c, 0))
            self.horizontal = nn.Conv2d(R, R, groups=R, bias=False, **_axis(c, 1))
        else:
            self.spatial = nn.Conv2d(R, R, c["kernel_size"], c["stride"], c["padding"], c["dilation"], groups=R,
                                     bias=False, padding_mode=padding_mode)
        self.last = nn.Conv2d(R, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, conv, weights, factors, form="4way"):
        """``weights`` [R] and factors [T, R], [S, R], then [kh, R], [kw, R] (4-way) or
        [kh·kw, R] (3-way); the weights λ are folded into the output factor; bias copied."""
        T, S, kh, kw = conv.weight.shape
        layer = cls(**conv_config(conv), rank=weights.shape[0], form=form).to(conv.weight)
        A_T, A_S, *spatial = factors
        _set(layer.first, A_S.T, conv.weight)
        if form == "4way":
            _set(layer.vertical, spatial[0].T, conv.weight)
            _set(layer.horizontal, spatial[1].T, conv.weight)
        else:
            _set(layer.spatial, spatial[0].T, conv.weight)
        _set(layer.last, A_T * weights, conv.weight)
        _set_bias(layer.last, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv, rank, form="4way", **options):
        """CP-ALS of ``conv.weight`` at ``rank`` (see :func:`lowrank.decompose.cp.conv_cp`)."""
        from .decompose.cp import conv_cp

        _checked(conv, nn.Conv2d)
        result = conv_cp(conv.weight.detach().double(), rank, form=form, **options)
        return cls.from_factors(conv, result.weights, result.factors, form)

    @property
    def weight(self):
        A_S, A_T = self.first.weight[:, :, 0, 0], self.last.weight[:, :, 0, 0]  # [R, S], [T, R]
        if self.form == "4way":
            spatial = self.vertical.weight[:, 0, :, 0, None] * self.horizontal.weight[:, 0, 0, None, :]
        else:
            spatial = self.spatial.weight[:, 0]
        return torch.einsum("tq,qs,qij->tsij", A_T, A_S, spatial)
