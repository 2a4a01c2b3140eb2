"""Build the Fashion-MNIST subset that ships in the repo (train/assets/fashion_mnist_subset.npz).

    python -m train.make_subset [--source /usr/share/datasets/fashion-mnist] [--train 10000] [--test 2000]

Takes a class-balanced random subset (fixed seed) of the real Fashion-MNIST
files from Debian's dataset-fashion-mnist package (apt-get install
dataset-fashion-mnist), stored shuffled, as uint8 arrays in a compressed .npz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from plumbing.files import WriteError, write_with

from .data import DEBIAN_FMNIST, SUBSET_PATH, DataError, load_fmnist_arrays


def stratified(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    if total % len(classes):
        raise ValueError(f"{total} is not a multiple of the {len(classes)} classes")
    per_class = total // len(classes)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return rng.permutation(np.concatenate(picks))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEBIAN_FMNIST, help="folder with the four IDX files")
    parser.add_argument("--out", type=Path, default=SUBSET_PATH)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=20251115)
    args = parser.parse_args(argv)
    try:
        arrays = load_fmnist_arrays(args.source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    tr = stratified(arrays["train_labels"], args.train, rng)
    te = stratified(arrays["test_labels"], args.test, rng)
    try:
        write_with(args.out, lambda f: np.savez_compressed(
            f,
            train_images=arrays["train_images"][tr], train_labels=arrays["train_labels"][tr].astype(np.uint8),
            test_images=arrays["test_images"][te], test_labels=arrays["test_labels"][te].astype(np.uint8),
            train_source_index=tr.astype(np.int32), test_source_index=te.astype(np.int32),
        ))
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {len(tr)} train, {len(te)} test images "
          f"from {args.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
