"""linops.data: the IDX reader and MNIST loader on tiny files written here, the digits."""

import gzip
import struct

import numpy as np
import pytest
import torch

from linops.data import (
    ImageDataset,
    find_mnist,
    load_digits,
    load_mnist,
    mnist_or_digits,
    read_idx,
)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">i", s)
                                                        for s in array.shape)
    big = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    return header + array.astype(big).tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _tiny_mnist(folder, gz: bool, n=5, train=True, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n).astype(np.uint8)
    prefix = "train" if train else "t10k"
    _write(folder / f"{prefix}-images-idx3-ubyte", _idx_bytes(images, 0x08), gz)
    _write(folder / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 0x08), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trip(tmp_path, gz, code):
    rng = np.random.RandomState(1)
    if code in (0x0D, 0x0E):
        a = rng.randn(3, 4, 2)
    else:
        lo, hi = {0x08: (0, 256), 0x09: (-128, 128), 0x0B: (-3000, 3000),
                  0x0C: (-70000, 70000)}[code]
        a = rng.randint(lo, hi, size=(3, 4, 2))
    path = _write(tmp_path / "a-idx3", _idx_bytes(a, code), gz)
    t = read_idx(path)
    expected_dtype = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16,
                      0x0C: torch.int32, 0x0D: torch.float32, 0x0E: torch.float64}[code]
    assert t.dtype == expected_dtype and tuple(t.shape) == (3, 4, 2)
    ref = torch.as_tensor(a.astype({0x0D: np.float32}.get(code, a.dtype)))
    assert torch.equal(t, ref.to(expected_dtype))


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    code = tmp_path / "code"
    code.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        read_idx(code)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_parses_the_files(tmp_path, gz):
    images, labels = _tiny_mnist(tmp_path, gz)
    ds = load_mnist(tmp_path)
    assert isinstance(ds, ImageDataset) and isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 5 and ds.images.shape == (5, 1, 28, 28)
    assert ds.images.dtype == torch.float32 and ds.targets.dtype == torch.int64
    x, y = ds[3]
    assert torch.allclose(x[0], torch.as_tensor(images[3], dtype=torch.float32) / 255)
    assert int(y) == int(labels[3])
    assert "MNIST train (5 images 28×28" in ds.source
    flat = load_mnist(tmp_path, flatten=True, dtype=torch.float64)
    assert flat.images.shape == (5, 784) and flat.images.dtype == torch.float64
    assert torch.allclose(flat.images[3].float(), x.reshape(-1))


def test_load_mnist_torchvision_layout_and_test_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = _tiny_mnist(raw, gz=True, n=3, train=False, seed=2)
    ds = load_mnist(tmp_path, train=False)
    assert len(ds) == 3 and torch.equal(ds.targets, torch.as_tensor(labels, dtype=torch.int64))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)


def test_load_mnist_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte and train-labels-idx1-ubyte" in msg
    assert str(tmp_path) in msg and "load_digits" in msg
    # images present, labels missing: only the labels are named as missing
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((1, 28, 28), np.uint8),
                                                            0x08), False)
    with pytest.raises(FileNotFoundError, match="missing train-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_mismatched_files(tmp_path):
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((2, 28, 28), np.uint8),
                                                            0x08), False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(3, np.uint8), 0x08), False)
    with pytest.raises(ValueError, match="expected \\(N, H, W\\) images and \\(N,\\) labels"):
        load_mnist(tmp_path)


def test_load_digits_real_images():
    from sklearn.datasets import load_digits as sk

    ref = sk()
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.targets.shape == (1797,)
    assert torch.allclose(ds.images[10, 0].double(), torch.as_tensor(ref.images[10]) / 16)
    assert torch.equal(ds.targets, torch.as_tensor(ref.target))
    assert sorted(ds.targets.unique().tolist()) == list(range(10))


def test_load_digits_resized_like_mnist():
    ds = load_digits(28)
    x = ds.images
    assert x.shape == (1797, 1, 28, 28)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert float(x[:, 0][:, border].abs().max()) == 0.0  # MNIST's 4-pixel frame
    # the 20×20 interior averaged back to 8×8 is close to the original image
    small = load_digits()
    back = torch.nn.functional.adaptive_avg_pool2d(x[:, :, 4:24, 4:24], 8)
    a, b = back.reshape(1797, -1), small.images.reshape(1797, -1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert float(corr.min()) > 0.8 and float(corr.mean()) > 0.9
    # and each resized image is closer to its own original than to the next one's
    assert float((corr > (a * b.roll(1, 0)).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
                  ).float().mean()) > 0.95
    assert "28×28" in ds.source
    assert load_digits(28, flatten=True).images.shape == (1797, 784)
    assert load_digits(16).images.shape == (1797, 1, 16, 16)


def test_load_digits_split_and_errors():
    tr, te = load_digits(train=True), load_digits(train=False)
    assert len(tr) == 1438 and len(te) == 359
    both = torch.cat([tr.images, te.images]).reshape(1797, -1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(
        load_digits().images.reshape(1797, -1), dim=0).shape[0]
    with pytest.raises(ValueError, match="size must be None or an integer"):
        load_digits(4)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_digits(dtype=torch.int64)


def test_mnist_or_digits(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LINOPS_MNIST_DIR", str(empty))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_mnist() is None
    ds = mnist_or_digits()
    assert ds.images.shape[1:] == (1, 28, 28) and "no MNIST files found" in ds.source
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist_or_digits(empty)
    _tiny_mnist(empty, gz=True)
    assert find_mnist() == empty
    ds = mnist_or_digits()
    assert len(ds) == 5 and ds.source.startswith("MNIST train")
