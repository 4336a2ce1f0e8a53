"""Data for the notebooks and examples: MNIST from its IDX files, or scikit-learn's digits.

Nothing here downloads anything. ``load_mnist(root)`` reads the four standard MNIST files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each gzipped or not) from a directory you give;
``load_digits()`` is the offline default: the 1,797 real 8×8 handwritten digits that ship
inside scikit-learn (``sklearn.datasets.load_digits``), optionally resized to 28×28 so that
networks written for MNIST run on them unchanged. ``mnist_or_digits(root)`` takes MNIST
where its files are and the digits otherwise, and says which in ``dataset.source``.

Every loader returns an :class:`ImageDataset`, a ``torch.utils.data.Dataset`` of pairs
``(image, label)``: images ``(1, H, W)`` (or flat ``(H·W,)`` with ``flatten=True``) with
values in [0, 1], labels ``int64`` in 0..9.

Example:
    >>> from linops.data import load_digits
    >>> ds = load_digits(size=28)
    >>> len(ds), tuple(ds[0][0].shape), ds.source[:31]
    (1797, (1, 28, 28), 'scikit-learn load_digits (1797 ')
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch

__all__ = [
    "ImageDataset",
    "read_idx",
    "load_mnist",
    "load_digits",
    "mnist_or_digits",
    "find_mnist",
    "MNIST_FILES",
]

#: the standard MNIST file names (without ``.gz``) per split
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes: https://yann.lecun.com/exdb/mnist/ ("the IDX file format")
_IDX_TYPES = {
    0x08: (torch.uint8, 1, None),
    0x09: (torch.int8, 1, None),
    0x0B: (torch.int16, 2, ">i2"),
    0x0C: (torch.int32, 4, ">i4"),
    0x0D: (torch.float32, 4, ">f4"),
    0x0E: (torch.float64, 8, ">f8"),
}


class ImageDataset(torch.utils.data.Dataset):
    """Images and integer labels held as two tensors.

    Attributes:
        images: ``(N, 1, H, W)`` (or ``(N, H·W)`` when flattened), floating, in [0, 1].
        targets: ``(N,)`` int64.
        source: where the data came from, in words (print it).

    ``ds[i]`` is ``(images[i], targets[i])``; ``ds.tensors`` is ``(images, targets)``, the
    whole set as one batch.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, source: str):
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} labels.")
        self.images = images
        self.targets = targets
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.targets

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images {tuple(self.images.shape[1:])}: {self.source})"


def read_idx(path) -> torch.Tensor:
    """The array stored in an IDX file (gzipped or not: told apart by its first bytes).

    The format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d``, then ``d`` big-endian
    int32 sizes and the data in row-major order, big-endian.

    Raises:
        ValueError: the file is not IDX (bad magic number, unknown type) or its size does
            not match its header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path} is not an IDX file: it must start with two zero bytes, a type code and "
            f"the number of dimensions; got {raw[:4]!r}."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (expected one of "
                         f"{', '.join(f'0x{c:02X}' for c in _IDX_TYPES)}).")
    dtype, size, big_endian = _IDX_TYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} sizes).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + size * math.prod(shape)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: the header says shape {shape} of {dtype} ({expected} bytes with the "
            f"header) but the file holds {len(raw)} bytes: truncated or not an IDX file."
        )
    body = bytearray(raw[header:])
    if big_endian is None:
        return torch.frombuffer(body, dtype=dtype).reshape(shape).clone()
    import numpy as np

    return torch.from_numpy(np.frombuffer(body, dtype=big_endian).astype(big_endian[1:])
                            .reshape(shape))


def _find_file(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _finish(images: torch.Tensor, flatten: bool, dtype: torch.dtype) -> torch.Tensor:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}.")
    images = images.to(dtype)
    return images.reshape(images.shape[0], -1) if flatten else images


def load_mnist(root, train: bool = True, *, flatten: bool = False,
               dtype: torch.dtype = torch.float32) -> ImageDataset:
    """MNIST read from its standard IDX files in ``root``.

    Looks for ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (``train=True``;
    ``t10k-...`` for the test set), each possibly with ``.gz``, in ``root``, in
    ``root/MNIST/raw`` (torchvision's layout) and in ``root/raw``.

    Args:
        root: a directory.
        train: the 60,000 training images (True) or the 10,000 test images (False).
        flatten: images as ``(784,)`` vectors instead of ``(1, 28, 28)``.
        dtype: the images' floating dtype; pixel values are divided by 255.

    Raises:
        FileNotFoundError: naming the files expected and the folders searched.
        ValueError: a file is not IDX, or images and labels do not match.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be True or False; got {train!r}.")
    root = Path(os.path.expanduser(str(root)))
    names = MNIST_FILES[train]
    found = [_find_file(root, n) for n in names]
    if None in found:
        missing = [n for n, p in zip(names, found) if p is None]
        raise FileNotFoundError(
            f"MNIST {'training' if train else 'test'} files not found: expected "
            f"{' and '.join(names)} (each possibly gzipped, '.gz') in {root}, "
            f"{root / 'MNIST' / 'raw'} or {root / 'raw'}; missing {', '.join(missing)}. "
            "Put the four standard MNIST files there, or use linops.data.load_digits() "
            "(offline, from scikit-learn) instead."
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{found[0].name} holds shape {tuple(images.shape)} and {found[1].name} shape "
            f"{tuple(labels.shape)}: expected (N, H, W) images and (N,) labels."
        )
    x = _finish(images[:, None].to(torch.float64) / 255.0, flatten, dtype)
    source = (f"MNIST {'train' if train else 'test'} ({images.shape[0]} images "
              f"{images.shape[1]}×{images.shape[2]} from {found[0].parent})")
    return ImageDataset(x, labels.to(torch.int64), source)


def load_digits(size: int | None = None, *, train: bool | None = None, flatten: bool = False,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> ImageDataset:
    """scikit-learn's handwritten digits (``sklearn.datasets.load_digits``): 1,797 real 8×8
    images of the digits 0..9, shipped inside the package (no download).

    Args:
        size: None or 8 keeps 8×8; 28 makes them MNIST-shaped as MNIST lays out its digits:
            each image is resized bilinearly to 20×20 and centred in a 28×28 frame (4 pixels
            of zeros around). Any other size ``s ≥ 8`` resizes to ``s × s``.
        train: None for all 1,797 images; True for a fixed 80% (1,437 images) and False for
            the other 360, split by a permutation drawn from ``seed``.
        flatten: images as vectors ``(size²,)`` instead of ``(1, size, size)``.
        dtype: the images' floating dtype; pixel values (0..16) are divided by 16.
        seed: the seed of the train/test permutation.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``, or
            ``pip install linops[data]``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn (or pip install "
            "linops[data]); or give MNIST files to load_mnist(root)."
        ) from err
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ValueError(f"size must be None or an integer ≥ 8 (28 for MNIST's shape); got "
                         f"{size!r}.")
    if train not in (None, True, False):
        raise TypeError(f"train must be None, True or False; got {train!r}.")
    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)[:, None] / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    part = "all"
    if train is not None:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(round(0.8 * len(labels)))
        idx = perm[:cut] if train else perm[cut:]
        images, labels = images[idx], labels[idx]
        part = "train 80%" if train else "test 20%"
    shape = "8×8"
    if size == 28:
        inner = torch.nn.functional.interpolate(images, size=(20, 20), mode="bilinear",
                                                align_corners=False)
        images = torch.nn.functional.pad(inner, (4, 4, 4, 4))
        shape = "8×8, resized to 20×20 and centred in 28×28 as MNIST's digits"
    elif size not in (None, 8):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False)
        shape = f"8×8, resized to {size}×{size}"
    images = images.clamp_(0.0, 1.0)
    source = f"scikit-learn load_digits ({len(labels)} images {shape}; {part})"
    return ImageDataset(_finish(images, flatten, dtype), labels, source)


def find_mnist(root=None) -> Path | None:
    """The first directory holding the MNIST training files: ``root`` if given, else the
    environment variable ``LINOPS_MNIST_DIR``, else ``~/data``, ``~/.cache/mnist`` and
    ``./data``; None if none does."""
    if root is not None:
        candidates = [root]
    else:
        candidates = [os.environ.get("LINOPS_MNIST_DIR"), "~/data", "~/.cache/mnist", "data"]
    for c in candidates:
        if not c:
            continue
        path = Path(os.path.expanduser(str(c)))
        if all(_find_file(path, n) is not None for n in MNIST_FILES[True]):
            return path
    return None


def mnist_or_digits(root=None, train: bool = True, *, flatten: bool = False,
                    dtype: torch.dtype = torch.float32) -> ImageDataset:
    """MNIST when its files are in ``root`` (or, with ``root=None``, where
    :func:`find_mnist` finds them), else the offline digits resized to 28×28.

    A ``root`` that is given but holds no MNIST files is an error (``FileNotFoundError``
    naming the files), not a silent fallback. ``dataset.source`` says which data it is.
    For the digits, ``train`` picks the fixed 80% / 20% split of :func:`load_digits`.
    """
    if root is not None:
        return load_mnist(root, train, flatten=flatten, dtype=dtype)
    found = find_mnist()
    if found is not None:
        return load_mnist(found, train, flatten=flatten, dtype=dtype)
    ds = load_digits(28, train=train, flatten=flatten, dtype=dtype)
    ds.source += " — no MNIST files found (give a directory or set LINOPS_MNIST_DIR)"
    return ds
