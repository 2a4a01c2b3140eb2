"""Data loading: the bundled subset, and fake data sets written here in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from train.data import (
    DATASETS,
    DataError,
    EpochLoader,
    ImageData,
    load_dataset,
    read_idx,
)


def test_bundled_subset_is_real_and_balanced():
    train, test, info = load_dataset("fmnist-subset")
    assert train.images.shape == (10_000, 1, 28, 28) and test.images.shape == (2_000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == 28
    # real images: varied, not constant or noise-like (mean intensity of Fashion-MNIST is about 0.29)
    assert 0.2 < float(train.images.float().mean()) / 255 < 0.4
    assert len(torch.unique(train.images[:50].flatten(1), dim=0)) == 50


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fmnist(folder, compress, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), compress)
    _write_idx(folder / "train-labels-idx1-ubyte", np.arange(n_train) % 10, compress)
    _write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), compress)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_from_idx_folder(tmp_path, compress):
    _fake_fmnist(tmp_path / "fm", compress)
    train, test, info = load_dataset("fmnist", tmp_path / "fm")
    assert train.images.shape == (30, 1, 28, 28) and test.labels.tolist() == list(range(10))
    assert info.source == str(tmp_path / "fm")


def test_fmnist_torchvision_layout(tmp_path):
    _fake_fmnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    train, _, _ = load_dataset("fmnist", tmp_path)
    assert len(train) == 30


def test_malformed_idx_is_reported(tmp_path):
    _fake_fmnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x0a\x01\x02")  # truncated
    with pytest.raises(DataError, match="is truncated"):
        load_dataset("fmnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def _fake_cifar(root, name):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder = root / "cifar-100-python"
        files, key, classes = ["train", "test"], b"fine_labels", 100
    folder.mkdir(parents=True)
    for fname in files:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: [int(v) for v in rng.integers(0, classes, 4)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("name,n_train,classes", [("cifar10", 20, 10), ("cifar100", 4, 100)])
def test_cifar_torchvision_layout(tmp_path, name, n_train, classes):
    _fake_cifar(tmp_path, name)
    train, test, info = load_dataset(name, tmp_path)
    assert train.images.shape == (n_train, 3, 32, 32) and len(test) == 4
    assert info.num_classes == classes and info.augment


def test_cifar_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR10 not found: expected .*cifar-10-batches-py/.*--download"):
        load_dataset("cifar10", tmp_path)


def test_tinyimagenet_folder_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(2)
    lines = []
    for k, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train, test, info = load_dataset("tinyimagenet", tmp_path)
    assert train.images.shape == (6, 3, 64, 64) and test.labels.tolist() == [0, 1, 2]
    assert info.num_classes == 200 and info.image_size == 64
    assert list(root.glob("mpd_triton_cache_*.npz"))  # decoded once
    train2, _, _ = load_dataset("tinyimagenet", tmp_path)
    assert torch.equal(train.images, train2.images)


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(DataError, match="Tiny-ImageNet not found"):
        load_dataset("tinyimagenet", tmp_path)


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(DataError, match=f"unknown data set 'mnist'; choose one of {', '.join(DATASETS)}"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fmnist", tmp_path / "nope")


def _data(n=23):
    return ImageData(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(),
                     torch.arange(n) % 10)


def test_epoch_loader_deterministic_per_seed_and_epoch():
    data = _data()
    a = EpochLoader(data, 5, shuffle=True, seed=3)
    b = EpochLoader(data, 5, shuffle=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    b.set_epoch(3)
    first_a = next(iter(a))[1]
    first_b = next(iter(b))[1]
    assert not torch.equal(first_a, first_b)
    seen = torch.cat([y for _, y in a])
    assert sorted(seen.tolist()) == sorted(data.labels.tolist()) and len(a) == 5


def test_epoch_loader_shards_cover_everything():
    data = _data()
    eval_shards = [EpochLoader(data, 4, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    values = sorted(int(x[i, 0, 0, 0] * 255 + 0.5) for s in eval_shards for x, _ in s for i in range(len(x)))
    assert values == list(range(23))
    train_shards = [EpochLoader(data, 4, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in train_shards}) == 1  # padded: same number of batches per rank


def test_augmentation_is_deterministic_and_keeps_range():
    data = ImageData(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    a = EpochLoader(data, 8, shuffle=False, augment=True, seed=1)
    x1 = next(iter(a))[0]
    x2 = next(iter(a))[0]
    assert torch.equal(x1, x2) and x1.min() >= 0 and x1.max() <= 1
    assert not torch.equal(x1, data.images.float() / 255)
