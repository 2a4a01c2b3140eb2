"""Data sets as in-memory uint8 image tensors, and a deterministic epoch loader.

Every data set is loaded into ``ImageData`` (images [N, C, H, W] uint8, labels
int64) once; batches are cut from a per-epoch permutation drawn from
``(seed, epoch)``, and augmentation (random crop with padding, horizontal flip)
runs on whole batches with a generator seeded from ``(seed, epoch, step)``.
So the order and augmentation of an epoch do not depend on anything but the
seed: a resumed run sees exactly the batches the interrupted one would have.

Sources:
- ``fmnist-subset``: a real, stratified subset of Fashion-MNIST (10,000 train,
  2,000 test) committed in train/assets, built by ``python -m train.make_subset``.
- ``fmnist``: the full set: IDX files (.gz or not) in --data-dir, else Debian's
  dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist), else the
  torchvision layout (DIR/FashionMNIST/raw), else torchvision download with --download.
- ``cifar10`` / ``cifar100``: torchvision's layout (DIR/cifar-10-batches-py,
  DIR/cifar-100-python); --download fetches it.
- ``tinyimagenet``: the standard folder layout DIR/tiny-imagenet-200 (or DIR
  itself) with wnids.txt, train/<wnid>/images/*.JPEG, val/images and
  val/val_annotations.txt; decoded once into a cache file beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plumbing.files import WriteError, write_with

__all__ = ["DATASETS", "DataError", "ImageData", "DatasetInfo", "dataset_info", "load_dataset", "EpochLoader",
           "read_idx", "SUBSET_PATH", "DEBIAN_FMNIST"]

DATASETS = ("fmnist-subset", "fmnist", "cifar10", "cifar100", "tinyimagenet")
SUBSET_PATH = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(RuntimeError):
    """Missing or malformed data; the message says where to get it."""


@dataclass
class ImageData:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self):
        return self.images.shape[0]

    def limit(self, n: int | None) -> "ImageData":
        """The first n samples (the sets here are stored shuffled or stratified)."""
        return self if n is None or n >= len(self) else ImageData(self.images[:n], self.labels[:n])


@dataclass
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    augment: bool  # random crop + flip for natural images
    source: str


_STATS = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
# (channels, image size, classes) of each data set's images, known before loading them
_SHAPES = {"fmnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tinyimagenet": (3, 64, 200)}


def dataset_info(name: str, source: str = "") -> DatasetInfo:
    """What ``load_dataset(name)`` reports about a data set, without loading it."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    key = "fmnist" if name.startswith("fmnist") else name
    channels, size, classes = _SHAPES[key]
    mean, std = _STATS[key]
    return DatasetInfo(name, channels, classes, size, mean, std, augment=key != "fmnist", source=source)


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fmnist_folder(data_dir: Path | None) -> Path | None:
    candidates = []
    if data_dir is not None:
        candidates += [data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"]
    candidates += [DEBIAN_FMNIST]
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in FMNIST_FILES.values()):
            return folder
    return None


def load_fmnist_arrays(folder: Path) -> dict[str, np.ndarray]:
    arrays = {key: read_idx(_find_idx(folder, stem)) for key, stem in FMNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DataError(f"Fashion-MNIST files in {folder} have unexpected shapes: {images.shape}, {labels.shape}")
        if labels.max() > 9:
            raise DataError(f"Fashion-MNIST labels in {folder} go up to {labels.max()}, expected 0..9")
    return arrays


def _to_image_data(images: np.ndarray, labels: np.ndarray) -> ImageData:
    x = torch.from_numpy(np.array(images, dtype=np.uint8))  # a writable copy
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)))


def _load_fmnist_subset(path: Path = SUBSET_PATH):
    if not path.is_file():
        raise DataError(f"the bundled Fashion-MNIST subset {path} is missing; rebuild it with "
                        "`python -m train.make_subset` (needs Debian's dataset-fashion-mnist package)")
    try:
        z = np.load(path)
        return (_to_image_data(z["train_images"], z["train_labels"]),
                _to_image_data(z["test_images"], z["test_labels"]))
    except (KeyError, ValueError, OSError, EOFError) as e:
        raise DataError(f"the bundled subset {path} is malformed ({e}); rebuild it with `python -m train.make_subset`") from e


def _load_fmnist(data_dir: Path | None, download: bool):
    folder = _fmnist_folder(data_dir)
    if folder is None and download:
        import torchvision

        root = data_dir or Path("data")
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
        folder = _fmnist_folder(root)
    if folder is None:
        where = f"{data_dir} or " if data_dir else ""
        raise DataError(
            f"Fashion-MNIST not found in {where}{DEBIAN_FMNIST}. Install Debian's package "
            "(apt-get install dataset-fashion-mnist), point --data-dir at a folder with "
            "train-images-idx3-ubyte(.gz) and the other three IDX files, or pass --download (needs network). "
            "The bundled subset needs nothing: --data fmnist-subset."
        )
    arrays = load_fmnist_arrays(folder)
    return (_to_image_data(arrays["train_images"], arrays["train_labels"]),
            _to_image_data(arrays["test_images"], arrays["test_labels"])), str(folder)


# ---------------------------------------------------------------- CIFAR


def _load_cifar(name: str, data_dir: Path | None, download: bool):
    root = data_dir or Path("data")
    sub, train_files, test_files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[name]
    folder = root / sub
    if not folder.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    if not folder.is_dir():
        raise DataError(f"{name.upper()} not found: expected {folder}/ (torchvision's layout). "
                        f"Pass --data-dir DIR with DIR/{sub}, or --download (needs network).")

    def read(files):
        images, labels = [], []
        for fname in files:
            path = folder / fname
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[key], dtype=np.int64))
            except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
                raise DataError(f"{path} is missing or malformed ({e}); re-download {name} with --download") from e
        return _to_image_data(np.concatenate(images), np.concatenate(labels))

    return (read(train_files), read(test_files)), str(folder)


# ---------------------------------------------------------------- Tiny-ImageNet


def _load_tinyimagenet(data_dir: Path | None):
    root = data_dir or Path("data")
    folder = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = folder / "wnids.txt"
    annotations = folder / "val" / "val_annotations.txt"
    if not wnids_file.is_file() or not annotations.is_file() or not (folder / "train").is_dir():
        raise DataError(
            f"Tiny-ImageNet not found in {root}: expected tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/ "
            "and val/images/ + val/val_annotations.txt (the layout of http://cs231n.stanford.edu/tiny-imagenet-200.zip); "
            "unpack it and pass --data-dir"
        )
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train_files = []
    for w in wnids:
        train_files += [(p, index[w]) for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    val_files = []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise DataError(f"{annotations}: class {parts[1]!r} is not in wnids.txt")
        val_files.append((folder / "val" / "images" / parts[0], index[parts[1]]))
    if not train_files or not val_files:
        raise DataError(f"Tiny-ImageNet in {folder} has {len(train_files)} train and {len(val_files)} val images")

    listing = "\n".join(f"{p.relative_to(folder)} {y}" for p, y in train_files + val_files)
    digest = hashlib.sha1(listing.encode()).hexdigest()[:12]
    cache = folder / f"mpd_triton_cache_{digest}.npz"
    if cache.is_file():
        z = np.load(cache)
        return (_to_image_data(z["train_images"], z["train_labels"]),
                _to_image_data(z["test_images"], z["test_labels"])), str(folder)

    from PIL import Image
    from tqdm import tqdm

    def decode(files, desc):
        images = np.empty((len(files), 3, 64, 64), dtype=np.uint8)
        for i, (path, _) in enumerate(tqdm(files, desc=desc, leave=False)):
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if im.size != (64, 64):
                        im = im.resize((64, 64))
                    images[i] = np.asarray(im).transpose(2, 0, 1)
            except OSError as e:
                raise DataError(f"cannot decode {path}: {e}") from e
        return images, np.array([y for _, y in files], dtype=np.int64)

    tr_x, tr_y = decode(train_files, "decoding Tiny-ImageNet train")
    te_x, te_y = decode(val_files, "decoding Tiny-ImageNet val")
    try:
        write_with(cache, lambda f: np.savez(f, train_images=tr_x, train_labels=tr_y, test_images=te_x,
                                             test_labels=te_y))
    except WriteError:
        pass  # a read-only or full data folder: decode again next time
    return (_to_image_data(tr_x, tr_y), _to_image_data(te_x, te_y)), str(folder)


# ---------------------------------------------------------------- entry point


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False):
    """-> (train ImageData, test ImageData, DatasetInfo)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not data_dir.exists():
        raise DataError(f"--data-dir {data_dir} does not exist")
    if name == "fmnist-subset":
        (train, test), source = _load_fmnist_subset(), str(SUBSET_PATH)
    elif name == "fmnist":
        (train, test), source = _load_fmnist(data_dir, download)
    elif name in ("cifar10", "cifar100"):
        (train, test), source = _load_cifar(name, data_dir, download)
    else:
        (train, test), source = _load_tinyimagenet(data_dir)
    info = dataset_info(name, source)
    num_classes = info.num_classes
    for split, data in (("train", train), ("test", test)):
        if int(data.labels.max()) >= num_classes or int(data.labels.min()) < 0:
            raise DataError(f"{name} {split} labels outside 0..{num_classes - 1} (source {source})")
        shape = (info.in_channels, info.image_size, info.image_size)
        if tuple(data.images.shape[1:]) != shape:
            raise DataError(f"{name} {split} images are {tuple(data.images.shape[1:])}, expected {shape} "
                            f"(source {source})")
    return train, test, info


class EpochLoader:
    """Batches of float images in [0, 1] and labels, deterministic in (seed, epoch, step).

    With ``world_size > 1`` each rank takes every world_size-th sample of the
    shared permutation, padded (``pad=True``, for training: every rank gets the
    same number of batches) or not (for evaluation: every sample counted once).
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool, augment: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 pad: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.device = torch.device(device)
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.pad:
                per_rank = -(-n // self.world_size)
                order = torch.cat([order, order[: per_rank * self.world_size - n]])
            order = order[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices()
        for step in range(len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.data.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            y = self.data.labels[idx].to(self.device, non_blocking=True)
            if self.augment:
                x = self._augment(x, step)
            yield x, y

    def _augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Random crop (4-pixel zero padding) and horizontal flip, per image."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + step * 7 + self.rank)
        B, _, H, W = x.shape
        shifts = torch.randint(-4, 5, (B, 2), generator=g)
        flips = torch.rand(B, generator=g) < 0.5
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        out = torch.empty_like(x)
        for i in range(B):
            dy, dx = int(shifts[i, 0]) + 4, int(shifts[i, 1]) + 4
            img = padded[i, :, dy:dy + H, dx:dx + W]
            out[i] = img.flip(-1) if flips[i] else img
        return out
