import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

import lowrank as lr
from lowrank.storage import CorruptDataError, MissingDataError, sha256


def test_offline_files_match_their_checksums():
    root = lr.storage.data_root()
    sums = dict(line.split(maxsplit=1)[::-1] for line in (root / "SHA256SUMS").read_text().splitlines())
    for name in ["cifar10-offline/test.npz", "cifar10-offline/train.npz", "MNIST/raw/t10k-images-idx3-ubyte"]:
        assert sha256(root / name) == sums[name]


def test_cifar10_items_are_normalised_real_images():
    test = lr.data.cifar10("test")
    assert len(test) in (1017, 10000)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 3  # the first official test image is a cat
    assert -2.2 < x.min() < x.max() < 2.7
    assert len(lr.data.cifar10("test", limit=100)) == 100


def test_cifar10_augmentation_changes_images_but_not_labels():
    plain, augmented = lr.data.cifar10("train", limit=8), lr.data.cifar10("train", limit=8, augment=True)
    torch.manual_seed(0)
    pairs = [(plain[i], augmented[i]) for i in range(8)]
    assert all(a[1] == b[1] for a, b in pairs)
    assert any(not torch.equal(a[0], b[0]) for a, b in pairs)


def test_mnist_and_imagenet_sample():
    x, y = lr.data.mnist("test")[0]
    assert x.shape == (1, 28, 28) and y == 7
    assert len(lr.data.mnist("train")) == 60000
    sample = lr.data.imagenet_sample(32)
    assert len(sample) == 1000
    x, y = sample[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert sample[999][1] == 999


@pytest.mark.parametrize("call", [lambda: lr.data.cifar10("valid"), lambda: lr.data.cifar10(limit=0),
                                  lambda: lr.data.mnist("dev"), lambda: lr.data.imagenet_sample(3)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))  # no earlier download found
    for call in [lambda: lr.data.cifar10(download=False), lambda: lr.data.mnist(download=False),
                 lambda: lr.data.imagenet_sample(download=False)]:
        with pytest.raises(MissingDataError) as error:
            call()
        assert str(tmp_path) in str(error.value) and "LOWRANK_DATA" in str(error.value)


PER_BATCH = 1020  # a fake full CIFAR-10: 5 training batches of 1,020 images and 1,020 test images


def fake_cifar10(root, seed=0):
    """Write a small CIFAR-10 in the official python layout (cifar-10-batches-py/); return its
    training images [5, PER_BATCH, 32, 32, 3], labels [5, PER_BATCH], test images and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (6, PER_BATCH, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (6, PER_BATCH))
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    for name, x, y in zip(names, images, labels):
        rows = x.transpose(0, 3, 1, 2).reshape(PER_BATCH, 3072)  # official rows: RRR…GGG…BBB…
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": y.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(lr.data.CIFAR10_CLASSES)}))
    return images[:5], labels[:5], images[5], labels[5]


def offline_subset(root, train, train_labels, test, test_labels):
    """The book's offline subset of a full CIFAR-10: the first 1,017 of each training batch."""
    (root / "cifar10-offline").mkdir(parents=True)
    keep = lr.data.OFFLINE_PER_BATCH
    np.savez(root / "cifar10-offline" / "train.npz", images=train[:, :keep].reshape(-1, 32, 32, 3),
             labels=train_labels[:, :keep].reshape(-1), classes=np.array(lr.data.CIFAR10_CLASSES))
    np.savez(root / "cifar10-offline" / "test.npz", images=test[:keep], labels=test_labels[:keep],
             classes=np.array(lr.data.CIFAR10_CLASSES))


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A fake full CIFAR-10 and its offline subset, each in its own data root; an empty cache."""
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    # torchvision checks the official files' md5; these fake ones have their own
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda path, md5=None: True)
    arrays = fake_cifar10(tmp_path / "full")
    offline_subset(tmp_path / "offline", *arrays)
    return tmp_path / "full", tmp_path / "offline", arrays


def items(dataset, indices):
    return torch.stack([dataset[i][0] for i in indices]), [dataset[i][1] for i in indices]


def test_full_cifar10_gives_the_offline_images_first(roots, monkeypatch):
    """With the full data set, cifar10(split, limit=n) returns the images of the offline subset,
    in its order: the same calibration and fine-tuning images on Colab as in the book."""
    full, offline, (train, train_labels, test, test_labels) = roots
    subset = {}
    for name, root in [("full", full), ("offline", offline)]:
        monkeypatch.setenv("LOWRANK_DATA", str(root))
        subset[name] = {split: lr.data.cifar10(split, limit=n)
                        for split, n in [("train", 5085), ("test", 1017)]}
        if name == "full":
            whole = lr.data.cifar10("train")
    assert len(subset["full"]["train"]) == len(subset["offline"]["train"]) == 5085
    assert len(subset["full"]["test"]) == len(subset["offline"]["test"]) == 1017
    for split in ("train", "test"):
        n = len(subset["offline"][split])
        some = sorted(set(range(0, n, 13)) | {1016, 1017, 2033, 2034, n - 1} & set(range(n)))
        x_full, y_full = items(subset["full"][split], some)
        x_off, y_off = items(subset["offline"][split], some)
        assert torch.equal(x_full, x_off) and y_full == y_off
    # the offline images are the batches' own: image 1,017 of the subset is batch 2's first
    transform = lr.data.cifar10_transform()
    assert torch.equal(subset["full"]["train"][1017][0], transform(train[1, 0]))
    assert subset["full"]["train"][1017][1] == train_labels[1, 0]
    # then the rest of the full training set, in official order: images 1,017… of each batch
    assert len(whole) == 5 * PER_BATCH
    rest, _ = items(whole, range(5085, 5 * PER_BATCH))
    keep = lr.data.OFFLINE_PER_BATCH
    assert torch.equal(rest, torch.stack([transform(x) for x in train[:, keep:].reshape(-1, 32, 32, 3)]))


def test_book_order_is_a_permutation_with_the_subset_first():
    order = lr.data.book_order(50_000)
    assert sorted(order) == list(range(50_000))
    assert order[:3] == [0, 1, 2] and order[1016:1019] == [1016, 10_000, 10_001]
    assert order[5085] == 1017 and order[-1] == 49_999


def test_data_root_is_never_written(roots, tmp_path, monkeypatch):
    """A data root that does not exist stays absent: CIFAR-10 (torchvision), the checkpoints and
    the ImageNet sample are downloaded into the download folder of the cache, sha256-checked."""
    full, _, _ = roots
    absent = tmp_path / "absent"
    monkeypatch.setenv("LOWRANK_DATA", str(absent))

    def download(self):  # stands in for torchvision's download: the fake files, where it is told
        fake_cifar10(type(absent)(self.root))

    monkeypatch.setattr(datasets.CIFAR10, "download", download)
    assert len(lr.data.cifar10("test")) == PER_BATCH
    assert (lr.storage.download_root() / "cifar-10-batches-py" / "test_batch").is_file()
    seen = []
    monkeypatch.setattr(datasets.MNIST, "download", lambda self: seen.append(self.root) or 1 / 0)
    with pytest.raises(MissingDataError):
        lr.data.mnist()
    assert seen == [lr.storage.download_root()]
    shared = lr.storage.find("checkpoints")
    monkeypatch.setattr(lr.models, "URL", "file:///nonexistent/")
    with pytest.raises(MissingDataError):
        lr.models.resnet20()
    monkeypatch.setattr(lr.models, "URL", f"file://{full.parent}/source/")
    (full.parent / "source").mkdir()
    (full.parent / "source" / "resnet20-12fca82f.th").write_bytes(b"not the published weights")
    with pytest.raises(MissingDataError) as error:  # the source's file has another sha256
        lr.models.resnet20()
    assert "hash" in str(error.value.__cause__)
    assert not absent.exists()
    assert shared is None  # nothing to find: LOWRANK_DATA and the cache are both empty


def test_checkpoint_and_imagenet_sample_download_into_the_cache(tmp_path, monkeypatch):
    real = lr.storage.data_root()
    absent = tmp_path / "absent"
    monkeypatch.setenv("LOWRANK_DATA", str(absent))
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lr.models, "URL", f"file://{real}/checkpoints/")
    model = lr.models.resnet20()
    assert not model.training
    assert (tmp_path / "cache" / "data" / "checkpoints" / "resnet20-12fca82f.th").is_file()
    three = dict(list(lr.data.imagenet_sample_files().items())[:3])
    monkeypatch.setattr(lr.data, "imagenet_sample_files", lambda: three)
    monkeypatch.setattr(lr.data, "IMAGENET_SAMPLE_URL", f"file://{real}/imagenet-sample/")
    sample = lr.data.imagenet_sample(32)
    assert len(sample) == 3 and sample[0][0].shape == (3, 32, 32)
    assert sorted(p.name for p in (tmp_path / "cache" / "data" / "imagenet-sample").iterdir()) == sorted(three)
    assert not absent.exists()


def test_imagenet_sample_hashes_are_those_of_the_data_record():
    """lowrank/imagenet_sample.sha256 pins each of the 1,000 files; the data folder's SHA256SUMS
    records the sha256 of their sorted `sha256sum imagenet-sample/*.JPEG` listing."""
    root = lr.storage.data_root()
    files = lr.data.imagenet_sample_files()
    assert len(files) == 1000 and sorted(files) == sorted(p.name for p in (root / "imagenet-sample").iterdir())
    listing = "".join(f"{files[n]}  imagenet-sample/{n}\n" for n in sorted(files))
    record = [line.split()[0] for line in (root / "SHA256SUMS").read_text().splitlines()
              if "imagenet-sample/*" in line]
    assert record == [hashlib.sha256(listing.encode()).hexdigest()]
    assert sha256(root / "imagenet-sample" / "n01440764_tench.JPEG") == files["n01440764_tench.JPEG"]


def test_truncated_offline_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "cifar10-offline").mkdir()
    good = lr.storage.data_root() / "cifar10-offline" / "test.npz"
    bad = tmp_path / "cifar10-offline" / "test.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CorruptDataError) as error:
        lr.data.cifar10("test")
    assert str(bad) in str(error.value) and "SHA256SUMS" in str(error.value)


@pytest.fixture
def ten_images(tmp_path, monkeypatch):
    """The ImageNet sample cut to its first ten files, with an empty user cache."""
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    ten = dict(list(lr.data.imagenet_sample_files().items())[:10])
    monkeypatch.setattr(lr.data, "imagenet_sample_files", lambda: ten)
    return ten


def test_imagenet_sample_splits_are_fixed_disjoint_halves(ten_images):
    everything = lr.data.imagenet_sample(16)
    calibration, test = lr.data.imagenet_sample(16, "calibration"), lr.data.imagenet_sample(16, "test")
    assert [y for _, y in everything] == list(range(10))
    assert [y for _, y in calibration] == [0, 6, 2, 8, 4] and [y for _, y in test] == [1, 7, 3, 9, 5]
    assert all(torch.equal(x, everything[y][0]) for x, y in [*calibration, *test])


@pytest.mark.parametrize("n", [1, 2, 5, 10, 500, 999])
def test_spread_orders_so_that_every_prefix_spans_the_range(n):
    order = lr.data.spread(n)
    assert sorted(order) == list(range(n))
    for prefix in (8, 16, 64):
        if prefix <= n:   # no gap between the first `prefix` values wider than 3 n / prefix
            values = sorted(order[:prefix]) + [order[0] + n]
            assert max(b - a for a, b in zip(values, values[1:])) <= 3 * n / prefix


def test_imagenet_sample_is_cached_in_the_user_cache_only(ten_images, tmp_path, monkeypatch):
    first = lr.data.imagenet_sample(24, preprocessing="torchvision")
    cached = list((tmp_path / "cache" / "imagenet-sample").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"
    assert not any(p.name.startswith("resized") for p in lr.storage.data_root().rglob("*.pt"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a JPEG although the images are cached")

    monkeypatch.setattr(lr.data.Image, "open", no_decoding)
    again = lr.data.imagenet_sample(24, preprocessing="torchvision")
    assert all(torch.equal(first[i][0], again[i][0]) for i in range(10))
    cached[0].write_bytes(b"truncated")                # a damaged cache is decoded again
    monkeypatch.undo()
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lr.data, "imagenet_sample_files", lambda: ten_images)
    assert torch.equal(lr.data.imagenet_sample(24, preprocessing="torchvision")[0][0], first[0][0])


def test_imagenet_sample_preprocessings_are_the_models_transforms(ten_images):
    """"cifar": the whole image at the size; "torchvision": resize 256, crop 224 (torchvision's
    ImageNet weights' transform), ImageNet mean/std; "efficientnet_lite": that crop, (x − 127)/128."""
    from torchvision import transforms as T
    from torchvision.models import ResNet18_Weights

    path = lr.data.imagenet_sample_folder() / sorted(ten_images)[0]
    with Image.open(path) as img:
        img = img.convert("RGB")
        cifar = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(lr.data.MEAN, lr.data.STD)])(img)
        torchvision = ResNet18_Weights.IMAGENET1K_V1.transforms()(img)
        pixels = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(img).float()
    torch.testing.assert_close(lr.data.imagenet_sample(32)[0][0], cifar)
    torch.testing.assert_close(lr.data.imagenet_sample(224, preprocessing="torchvision")[0][0], torchvision)
    lite = lr.data.imagenet_sample(224, preprocessing="efficientnet_lite")[0][0]
    torch.testing.assert_close(lite, (pixels - 127) / 128)
    assert -1 <= lite.min() < lite.max() <= 1


@pytest.mark.parametrize("call", [lambda: lr.data.imagenet_sample(32, "train"),
                                  lambda: lr.data.imagenet_sample(32, preprocessing="inception")])
def test_imagenet_sample_bad_split_or_preprocessing(call):
    with pytest.raises(ValueError, match="split|preprocessing"):
        call()


def test_benchmark_result_is_found_in_the_clone_above(monkeypatch):
    book = Path(__file__).resolve().parent.parent / "book"
    monkeypatch.chdir(book)
    path = lr.storage.benchmark_result("deploy.md")
    assert path == book.parent / "benchmarks" / "results" / "deploy.md"


def test_benchmark_result_outside_a_clone_names_the_file_and_address(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))

    def offline(url, dst, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(MissingDataError, match=r"benchmarks/results/absent\.md.*raw\.githubusercontent\.com"):
        lr.storage.benchmark_result("absent.md")
    (tmp_path / "cache" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "results" / "absent.md").write_text("downloaded before")
    assert lr.storage.benchmark_result("absent.md").read_text() == "downloaded before"
