"""Real data sets with the transforms the book's models expect.

Each loader looks in the data root (:func:`lowrank.storage.data_root`) for the full torchvision
data set first, then for the offline copy the book ships with (see the data README), and only
then tries to download; when all fail it raises :class:`~lowrank.storage.MissingDataError`.
Never random data.
"""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .storage import data_root, missing

#: ImageNet statistics, used by the pretrained CIFAR-10 ResNets (Idelbayev's training script).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class ImageArray(Dataset):
    """Images held in memory as uint8 [N, H, W, C] with labels [N]; yields ``(transform(img), label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes, transform):
        self.images, self.labels = images, labels
        self.classes, self.transform = list(classes), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _check_split(split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _first(dataset, limit):
    """The first ``limit`` items of ``dataset`` (all of them if ``limit`` is None)."""
    if limit is None:
        return dataset
    if int(limit) != limit or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return torch.utils.data.Subset(dataset, range(min(int(limit), len(dataset))))


def cifar10_transform(augment: bool = False):
    """ToTensor + normalisation; with ``augment``, random crop (padding 4) and horizontal flip first."""
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def cifar10(split: str = "test", limit: int | None = None, augment: bool = False, download: bool = True):
    """CIFAR-10 (Krizhevsky 2009) as a Dataset of (image [3, 32, 32] normalised, label).

    ``limit`` keeps the first images in official order, so a capped run sees the same images with
    the full set and with the offline subset (1,017 test / 5,085 train images).
    """
    _check_split(split)
    root, transform = data_root(), cifar10_transform(augment)
    if (root / "cifar-10-batches-py").is_dir():
        return _first(datasets.CIFAR10(root, train=split == "train", transform=transform), limit)
    offline = root / "cifar10-offline" / f"{split}.npz"
    if offline.is_file():
        arrays = np.load(offline)
        return _first(ImageArray(arrays["images"], arrays["labels"], arrays["classes"], transform), limit)
    if download:
        try:
            full = datasets.CIFAR10(root, train=split == "train", transform=transform, download=True)
            return _first(full, limit)
        except Exception as error:  # no network, no permission: say what to do instead
            raise missing("CIFAR-10", "cifar10-offline/{train,test}.npz (or cifar-10-batches-py/)",
                          "call lowrank.data.cifar10() on a machine with internet access, which "
                          "downloads it with torchvision") from error
    raise missing("CIFAR-10", "cifar10-offline/{train,test}.npz (or cifar-10-batches-py/)",
                  "call lowrank.data.cifar10(download=True) with internet access")


def mnist(split: str = "test", limit: int | None = None, download: bool = True):
    """MNIST (LeCun et al. 1998) as a Dataset of (image [1, 28, 28] normalised, label)."""
    _check_split(split)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    try:
        return _first(datasets.MNIST(data_root(), train=split == "train", transform=transform,
                                     download=False), limit)
    except RuntimeError as absent:
        if not download:
            raise missing("MNIST", "MNIST/raw/ (the four idx files)",
                          "call lowrank.data.mnist(download=True) with internet access") from absent
    try:
        return _first(datasets.MNIST(data_root(), train=split == "train", transform=transform,
                                     download=True), limit)
    except Exception as error:
        raise missing("MNIST", "MNIST/raw/ (the four idx files)",
                      "call lowrank.data.mnist() on a machine with internet access, which downloads "
                      "it with torchvision") from error


def imagenet_sample(size: int = 32):
    """1,000 ImageNet validation-style images, one per class, as a Dataset of
    (image [3, size, size] normalised with the ImageNet statistics, class index 0–999).

    Images are resized (shorter side) and centre-cropped to ``size``. The class index is the
    position of the file's WordNet id in sorted order.
    """
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer ≥ 8, got {size!r}")
    folder = data_root() / "imagenet-sample"
    files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
    if not files:
        raise missing("The ImageNet sample", "imagenet-sample/<wnid>_<name>.JPEG (1,000 images)",
                      "download the images of github.com/EliSchwartz/imagenet-sample-images into "
                      "that folder (ImageNet terms of use apply)")
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    wnids = sorted({f.name.split("_")[0] for f in files})
    index = {w: i for i, w in enumerate(wnids)}
    return ImageFiles(files, [index[f.name.split("_")[0]] for f in files], transform)


class ImageFiles(Dataset):
    """Image files on disk with labels; yields ``(transform(RGB image), label)``."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]
