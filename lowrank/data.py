"""Real data sets with the transforms the book's models expect.

Each loader looks in the data root (:func:`lowrank.storage.data_root`), then in the download
folder (:func:`lowrank.storage.download_root`), for the full torchvision data set first, then for
the offline copy the book ships with (see the data README), and only then downloads into the
download folder (never into the data root); when all fail it raises
:class:`~lowrank.storage.MissingDataError`, and an unreadable file raises
:class:`~lowrank.storage.CorruptDataError` naming it. Never random data.
"""
import hashlib
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .storage import cache_root, corrupt, data_root, download_root, find, missing

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


#: Images per official CIFAR-10 training batch in the offline subset (and the test images kept).
OFFLINE_PER_BATCH = 1017


def book_order(n: int, batches: int = 5, per_batch: int = OFFLINE_PER_BATCH) -> list[int]:
    """Indices of the full CIFAR-10 training set (``n`` images, ``batches`` equal official
    batches) in book order: the first ``per_batch`` images of each batch (the offline subset, in
    its order), then all the others in official order."""
    size = n // batches
    first = [b * size + i for b in range(batches) for i in range(min(per_batch, size))]
    chosen = set(first)
    return first + [i for i in range(n) if i not in chosen]


def cifar10(split: str = "test", limit: int | None = None, augment: bool = False, download: bool = True):
    """CIFAR-10 (Krizhevsky 2009) as a Dataset of (image [3, 32, 32] normalised, label).

    Images come in book order, so that ``limit`` selects the same images with the full data set
    and with the offline subset: the test set in official order (the subset holds its first
    1,017), the training set as the first 1,017 images of each of the 5 official batches (the
    subset's 5,085), then the rest (:func:`book_order`).
    """
    _check_split(split)
    transform, train = cifar10_transform(augment), split == "train"
    full = find("cifar-10-batches-py")
    offline = find(f"cifar10-offline/{split}.npz")
    if full is None and offline is None and download:
        try:
            datasets.CIFAR10(download_root(), train=train, download=True)
        except Exception as error:  # no network, no permission: say what to do instead
            raise missing("CIFAR-10", "cifar10-offline/{train,test}.npz (or cifar-10-batches-py/)",
                          "call lowrank.data.cifar10() on a machine with internet access, which "
                          "downloads it with torchvision") from error
        full = download_root() / "cifar-10-batches-py"
    if full is not None:
        try:
            data = datasets.CIFAR10(full.parent, train=train, transform=transform)
        except RuntimeError as error:  # torchvision's md5 check failed
            raise corrupt(full, "torchvision's md5 check of its batches failed",
                          "delete the folder and call lowrank.data.cifar10() with internet "
                          "access, or put the book's offline cifar10-offline/ there") from error
        if train:
            data = torch.utils.data.Subset(data, book_order(len(data)))
        return _first(data, limit)
    if offline is not None:
        try:
            with np.load(offline) as arrays:
                images, labels, classes = arrays["images"], arrays["labels"], arrays["classes"]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
            raise corrupt(offline, f"{type(error).__name__}: {error}",
                          "copy it again from the book's offline data (its sha256 is in the "
                          "data folder's SHA256SUMS), or delete it to use the full CIFAR-10") from error
        return _first(ImageArray(images, labels, classes, transform), limit)
    raise missing("CIFAR-10", "cifar10-offline/{train,test}.npz (or cifar-10-batches-py/)",
                  "call lowrank.data.cifar10(download=True) with internet access")


def mnist(split: str = "test", limit: int | None = None, download: bool = True):
    """MNIST (LeCun et al. 1998) as a Dataset of (image [1, 28, 28] normalised, label)."""
    _check_split(split)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    raw = find("MNIST/raw")
    if raw is not None:
        try:
            return _first(datasets.MNIST(raw.parent.parent, train=split == "train",
                                         transform=transform), limit)
        except RuntimeError as absent:
            if not download:
                raise missing("MNIST", "MNIST/raw/ (the four idx files)",
                              "call lowrank.data.mnist(download=True) with internet access") from absent
    elif not download:
        raise missing("MNIST", "MNIST/raw/ (the four idx files)",
                      "call lowrank.data.mnist(download=True) with internet access")
    try:
        return _first(datasets.MNIST(download_root(), train=split == "train", transform=transform,
                                     download=True), limit)
    except Exception as error:
        raise missing("MNIST", "MNIST/raw/ (the four idx files)",
                      "call lowrank.data.mnist() on a machine with internet access, which downloads "
                      "it with torchvision") from error


#: EfficientNet-Lite's input scaling, (x − 127) / 128 for pixel values x in 0–255 (the TensorFlow
#: reference's MEAN_RGB = 127, STDDEV_RGB = 128), as a mean and std of pixels in [0, 1]
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
#: name → (share of the resized image the centre crop keeps, mean, std) of the ImageNet sample's
#: preprocessings: "cifar" the whole image (shorter side resized to the size) normalised as the
#: CIFAR-10 ResNets expect; "torchvision" torchvision's ImageNet weights' (resize 256, crop 224);
#: "efficientnet_lite" the same crop scaled to [−1, 1], as EfficientNet-Lite's weights expect.
PREPROCESSING = {"cifar": (1.0, MEAN, STD), "torchvision": (0.875, MEAN, STD),
                 "efficientnet_lite": (0.875, LITE_MEAN, LITE_STD)}
IMAGENET_SPLITS = ("calibration", "test")


class NormalizedImages(Dataset):
    """uint8 images [N, 3, H, W] with labels [N]; yields ``((image / 255 − mean) / std, label)``,
    the image as float32 [3, H, W]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - self.mean) / self.std, int(self.labels[i])


def imagenet_sample(size: int = 32, split: str | None = None, preprocessing: str = "cifar",
                    download: bool = True):
    """1,000 ImageNet validation-style images, one per class, as a Dataset of
    (image [3, size, size] float32, class index 0–999).

    ``preprocessing`` (:data:`PREPROCESSING`): "cifar" (default) resizes the shorter side to
    ``size`` and keeps the centre square, normalised with the ImageNet statistics, as the CIFAR-10
    ResNets expect; "torchvision" resizes the shorter side to ``size / 0.875`` (256 for 224) and
    crops the centre ``size``, normalised likewise, as torchvision's ImageNet weights expect;
    "efficientnet_lite" crops the same way and scales pixels to [−1, 1] ((x − 127) / 128), as
    :func:`lowrank.models.efficientnet_lite0` expects. Resizing is bilinear with antialiasing.

    ``split``: the 1,000 images are one per class, the class index being the position of the
    file's WordNet id in sorted order; "calibration" is the 500 images of even class index and
    "test" the 500 of odd class index (``None``: all 1,000, in class order). Each half thus spans
    the whole class list, whose order groups related classes (the fish, the birds, the dog
    breeds, …), with one image of every other class: a fixed split, balanced over the classes, to
    calibrate on one half and measure on the other. A half comes in the fixed order
    :func:`spread`, so that its first n images (``limit=n``) span the class list too, instead of
    being the first n classes (all fish and birds).

    The resized images are decoded once and cached as a uint8 tensor in the user cache
    (:func:`lowrank.storage.cache_root`, never the data root); later calls load that tensor.
    """
    if isinstance(size, bool) or int(size) != size or size < 8:
        raise ValueError(f"size must be an integer ≥ 8, got {size!r}")
    if split not in (*IMAGENET_SPLITS, None):
        raise ValueError(f"split must be one of {IMAGENET_SPLITS} or None, got {split!r}")
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {sorted(PREPROCESSING)}, got {preprocessing!r}")
    crop, mean, std = PREPROCESSING[preprocessing]
    images, labels = _resized_sample(int(size), round(size / crop), download)
    if split is not None:
        half = (labels % 2 == (0 if split == "calibration" else 1)).nonzero().squeeze(1)
        order = half[spread(len(half))]
        images, labels = images[order], labels[order]
    return NormalizedImages(images, labels, mean, std)


def spread(n: int) -> list[int]:
    """A fixed order of ``range(n)`` in which every prefix spans the whole range: i ↦ k·i mod n,
    k the integer nearest n/φ (φ the golden ratio) that is coprime with n."""
    k = max(1, round(n / (1 + 5 ** 0.5) * 2))
    while math.gcd(k, n) != 1:
        k += 1
    return [k * i % n for i in range(n)]


def _resized_sample(size: int, resize: int, download: bool):
    """``(images uint8 [N, 3, size, size], labels [N])`` of the N = 1,000 images, the shorter
    side resized to ``resize`` and the centre ``size`` × ``size`` cropped; from the user cache,
    else decoded and written there."""
    names = imagenet_sample_files()
    listing = "".join(f"{names[n]}  {n}\n" for n in sorted(names))
    versions = f"torchvision {torchvision.__version__}, pillow {PIL.__version__}, {resize}/{size}"
    key = hashlib.sha256((listing + versions).encode()).hexdigest()[:16]
    path = cache_root() / "imagenet-sample" / f"resized-{resize}-{size}-{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached["images"].shape == (len(names), 3, size, size):
                return cached["images"], cached["labels"]
        except Exception:  # noqa: BLE001 (torch.load raises many kinds on a truncated file)
            pass  # an unfinished or damaged cache file: decode again and replace it
    folder = imagenet_sample_folder(download)
    files = [folder / n for n in sorted(names)]
    wnids = sorted({n.split("_")[0] for n in names})
    index = {w: i for i, w in enumerate(wnids)}
    labels = torch.tensor([index[f.name.split("_")[0]] for f in files])
    transform = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                                    transforms.PILToTensor()])
    images = []
    for f in files:
        with Image.open(f) as img:
            images.append(transform(img.convert("RGB")))
    images = torch.stack(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save({"images": images, "labels": labels}, partial)
    partial.replace(path)   # atomic: a concurrent reader sees the old file or the whole new one
    return images, labels


# The ImageNet sample off-machine: the same 1,000 files, from a pinned commit, sha256-checked.
IMAGENET_SAMPLE_URL = ("https://raw.githubusercontent.com/EliSchwartz/imagenet-sample-images/"
                       "bc69043e2862758a1906c6a24a792bb28c6bb2ff/")


def imagenet_sample_files() -> dict:
    """File name → sha256 of the 1,000 images (lowrank/imagenet_sample.sha256)."""
    lines = Path(__file__).with_name("imagenet_sample.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def imagenet_sample_folder(download: bool = True) -> Path:
    """The folder that holds all 1,000 sample images: the data root's, else the download folder's,
    where the missing ones are downloaded (each checked against its sha256) when ``download``."""
    import torch.hub
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import quote

    names = imagenet_sample_files()
    how = ("download the images of github.com/EliSchwartz/imagenet-sample-images into that folder "
           "(ImageNet terms of use apply), or call lowrank.data.imagenet_sample() with internet access")
    folders = (data_root() / "imagenet-sample", download_root() / "imagenet-sample")
    for folder in folders:
        if all((folder / name).is_file() for name in names):
            return folder
    if not download:
        raise missing("The ImageNet sample", "imagenet-sample/<wnid>_<name>.JPEG (1,000 images)", how)
    folder = folders[1]
    todo = [name for name in names if not (folder / name).is_file()]

    def get(name):
        torch.hub.download_url_to_file(IMAGENET_SAMPLE_URL + quote(name), str(folder / name),
                                       hash_prefix=names[name], progress=False)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        get(todo[0])  # one first: without network, fail at once
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(get, todo[1:]))
    except Exception as error:
        raise missing("The ImageNet sample", "imagenet-sample/<wnid>_<name>.JPEG (1,000 images)",
                      how) from error
    return folder
