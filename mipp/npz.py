"""Validation of uploaded .npz datasets, with numpy only (the API process imports this, not torch).

An upload holds `x` (N, D), (N, H, W) or (N, C, H, W) and `y` (N,) integer labels, and
optionally `x_test` and `y_test` of the same per-sample shape. Files are read with
`allow_pickle=False`, so nothing in them is ever unpickled. Other keys are ignored.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mipp.errors import DataError

MIN_TRAIN_SAMPLES = 20
MAX_BYTES = 8 * 2**30  # uncompressed size of all arrays; a small zip can inflate enormously
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


@dataclass(frozen=True)
class NpzSummary:
    """What a valid upload holds.

    `input_shape` is the per-sample shape the engine uses: (D,) or (C, H, W); an (N, H, W)
    upload gets a channel axis, (1, H, W).
    """

    n_train: int
    n_test: int
    input_shape: tuple[int, ...]
    num_classes: int
    has_test: bool


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataError(f"dataset file {path.name!r} does not exist")
    archive = None
    if zipfile.is_zipfile(path):  # checked first so a large non-zip file is never read whole
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path.name!r} is not a valid .npz file; save the arrays with "
            "numpy.savez(path, x=x, y=y) or numpy.savez_compressed")
    return archive


def _read(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(
                f"array {key!r} in {path.name!r} is an object array, which is not allowed "
                "(it would need unpickling); store a numeric array, e.g. "
                f"np.asarray({key}, dtype=np.float32)") from None
        raise DataError(f"array {key!r} in {path.name!r} is damaged ({exc}); save it again") \
            from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"array {key!r} in {path.name!r} is damaged ({exc}); save it again") \
            from None
    except MemoryError:
        raise DataError(f"array {key!r} in {path.name!r} is too large to load") from None


def _check_x(x: np.ndarray, key: str) -> None:
    if x.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(
            f"{key!r} must be numeric (int, uint, float or bool), got dtype {x.dtype}; "
            f"convert it with {key}.astype(np.float32)")
    if not 2 <= x.ndim <= 4:
        raise DataError(
            f"{key!r} must have shape (N, D), (N, H, W) or (N, C, H, W), got {x.shape}")
    if x.ndim == 4 and x.shape[1] > 4 and x.shape[-1] <= 4:
        # Channels-last images would silently train as nonsense; refuse with the fix.
        raise DataError(
            f"{key!r} of shape {x.shape} looks channels-last (N, H, W, C); images must be "
            f"(N, C, H, W): save {key}.transpose(0, 3, 1, 2)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(
            f"{key!r} contains NaN or infinite values; replace them (e.g. np.nan_to_num) "
            "or drop those samples")


def _check_y(y: np.ndarray, key: str, n_samples: int, x_key: str) -> np.ndarray:
    """Return `y` as int64 after checking it is 1-D integral labels >= 0, one per sample."""
    if y.ndim != 1:
        raise DataError(
            f"{key!r} must be 1-D class labels of shape (N,), got {y.shape}; "
            f"save {key}.ravel() (or argmax of one-hot labels)")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise DataError(
                f"{key!r} must hold integer class labels, got non-integral floats; "
                f"save {key}.astype(np.int64)")
    elif y.dtype.kind not in "iu":
        raise DataError(
            f"{key!r} must hold integer class labels, got dtype {y.dtype}; "
            f"save {key}.astype(np.int64)")
    if len(y) != n_samples:
        raise DataError(
            f"{key!r} has {len(y)} labels but {x_key!r} has {n_samples} samples; "
            "they must have the same length")
    if len(y) and y.min() < 0:
        raise DataError(
            f"{key!r} has negative label {y.min():g}; labels must be 0 .. num_classes-1")
    return y.astype(np.int64)


def _check_size(archive: np.lib.npyio.NpzFile, keys: list[str], path: Path,
                max_bytes: int) -> None:
    """Refuse before decompressing when the members' declared sizes exceed `max_bytes`."""
    members = set(archive.zip.namelist())
    total = sum(archive.zip.getinfo(f"{key}.npy" if f"{key}.npy" in members else key).file_size
                for key in keys)
    if total > max_bytes:
        raise DataError(
            f"{path.name!r} holds {total / 2**30:.1f} GiB of arrays once uncompressed, above "
            f"the limit of {max_bytes / 2**30:.1f} GiB; upload a subset of the samples")


def _read_and_check(path: str | Path, max_classes: int,
                    max_bytes: int) -> tuple[dict[str, np.ndarray], NpzSummary]:
    path = Path(path)
    with _open(path) as archive:
        keys = set(archive.files)
        for required in ("x", "y"):
            if required not in keys:
                raise DataError(
                    f"{path.name!r} has no array {required!r} (found: "
                    f"{', '.join(sorted(keys)) or 'none'}); save it with "
                    "numpy.savez(path, x=x, y=y[, x_test=..., y_test=...])")
        if ("x_test" in keys) != ("y_test" in keys):
            present, absent = ("x_test", "y_test") if "x_test" in keys else ("y_test", "x_test")
            raise DataError(
                f"{path.name!r} has {present!r} but no {absent!r}; give both or neither "
                "(without them 20% of the training data is held out)")
        wanted = ["x", "y"] + (["x_test", "y_test"] if "x_test" in keys else [])
        _check_size(archive, wanted, path, max_bytes)
        arrays = {key: _read(archive, key, path) for key in wanted}

    x = arrays["x"]
    _check_x(x, "x")
    arrays["y"] = y = _check_y(arrays["y"], "y", len(x), "x")
    if len(x) < MIN_TRAIN_SAMPLES:
        raise DataError(
            f"'x' has {len(x)} samples; at least {MIN_TRAIN_SAMPLES} are needed to train and "
            "to estimate anything")
    num_classes = int(y.max()) + 1
    if num_classes > max_classes:
        raise DataError(
            f"'y' has label {num_classes - 1}, above the limit of {max_classes} classes; "
            "labels must be 0 .. num_classes-1")
    if num_classes < 2:
        raise DataError("'y' holds a single class (0); classification needs at least 2 classes")

    n_test = 0
    if "x_test" in arrays:
        x_test = arrays["x_test"]
        _check_x(x_test, "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"'x_test' samples have shape {x_test.shape[1:]} but 'x' samples have "
                f"{x.shape[1:]}; both must share the per-sample shape")
        arrays["y_test"] = y_test = _check_y(arrays["y_test"], "y_test", len(x_test), "x_test")
        if len(x_test) == 0:
            raise DataError("'x_test' is empty; drop x_test/y_test or give at least one sample")
        if y_test.max() >= num_classes:
            raise DataError(
                f"'y_test' has label {int(y_test.max())} but 'y' only has labels 0 .. "
                f"{num_classes - 1}; test labels must be classes seen in training")
        n_test = len(x_test)

    input_shape = x.shape[1:] if x.ndim != 3 else (1, *x.shape[1:])
    summary = NpzSummary(n_train=len(x), n_test=n_test, input_shape=tuple(input_shape),
                         num_classes=num_classes, has_test=n_test > 0)
    return arrays, summary


def validate_npz(path: str | Path, max_classes: int = 10_000,
                 max_bytes: int = MAX_BYTES) -> NpzSummary:
    """Check an uploaded .npz dataset without unpickling anything; return what it holds.

    Raises DataError (naming the array key and the fix) for: not a .npz, object arrays,
    missing x/y, x_test without y_test (or the reverse), non-numeric x, NaN/inf in x,
    x not (N, D)/(N, H, W)/(N, C, H, W), y not 1-D integral labels, len(x) != len(y),
    negative labels or more than `max_classes` classes, fewer than 20 training samples,
    fewer than 2 classes, test samples of another shape or with unseen labels, arrays larger
    than `max_bytes` uncompressed (checked before decompressing).
    """
    return _read_and_check(path, max_classes, max_bytes)[1]


def load_npz_arrays(path: str | Path, max_classes: int = 10_000,
                    max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """Validated arrays of an upload: x, y (int64), and x_test, y_test (int64) when present.

    x keeps its stored dtype and shape; raises DataError as `validate_npz`.
    """
    return _read_and_check(path, max_classes, max_bytes)[0]
