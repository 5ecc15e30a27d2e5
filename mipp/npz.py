"""Validation of uploaded .npz datasets, with numpy only (the API process imports this, not torch).

An upload holds `x` (N, D), (N, H, W) or (N, C, H, W) and `y` (N,) integer labels, and
optionally `x_test` and `y_test` of the same per-sample shape, and `class_names` (strings, one
per class, at most MAX_CLASS_NAMES_BYTES). Files are never unpickled
(object arrays are refused from their header). Other keys are ignored.

Two entry points share one set of checks:
- `validate_npz` (the API) streams: it reads each array's .npy header from the zip (shape,
  dtype), checks the zip's declared sizes against those headers before inflating anything,
  then inflates each member in fixed-size chunks to check values. Memory stays at a few MB
  whatever the file holds, so a zip bomb costs at most its declared size in CPU time, and one
  that inflates more than `MAX_RATIO` times is refused from its headers alone.
- `load_npz_arrays` (the worker) loads the arrays whole and runs the same checks on them.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mipp.errors import DataError

MIN_TRAIN_SAMPLES = 20
MAX_BYTES = 8 * 2**30  # uncompressed size of all arrays; a small zip can inflate enormously
# A member that inflates more than this many times its stored size is refused before it is
# inflated (deflate's own maximum is ~1032x; real data, even all-zero images, stays far below
# this once a member is large). Small members (< RATIO_FREE_BYTES) are exempt.
MAX_RATIO = 200
RATIO_FREE_BYTES = 64 * 2**20
MAX_ZIP_ENTRIES = 10_000  # zipfile reads the whole central directory into Python objects
MAX_CENTRAL_DIRECTORY_BYTES = 4 * 2**20
CHUNK_BYTES = 4 * 2**20
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
    class_names: tuple[str, ...] | None = None


def _not_npz(path: Path, why: str = "") -> DataError:
    return DataError(
        f"{path.name!r} is not a valid .npz file{f' ({why})' if why else ''}; save the arrays "
        "with numpy.savez(path, x=x, y=y) or numpy.savez_compressed")


# ---------------------------------------------------------------------------------------------
# The zip's own structure, bounded before zipfile parses it


def zip_directory_size(fh: BinaryIO, size: int) -> tuple[int, int]:
    """(number of entries, central directory bytes) from the end-of-central-directory record
    (zip64 too), read from the file's last 64 kB. Raises ValueError if there is none."""
    tail_len = min(size, 65_535 + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise ValueError("no end-of-central-directory record")
    _sig, _d, _cd, _n_disk, entries, cd_size, _cd_off, _c = struct.unpack(
        "<4s4H2LH", tail[at:at + 22])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        locator = tail[at - 20:at] if at >= 20 else b""
        if len(locator) != 20 or locator[:4] != b"PK\x06\x07":
            raise ValueError("zip64 record announced but missing")
        (record_at,) = struct.unpack("<Q", locator[8:16])
        if record_at > size - 56:
            raise ValueError("zip64 record out of range")
        fh.seek(record_at)
        record = fh.read(56)
        if record[:4] != b"PK\x06\x06":
            raise ValueError("zip64 record damaged")
        entries, cd_size = struct.unpack("<QQ", record[32:48])
    return entries, cd_size


def open_bounded_zip(path: Path, max_entries: int = MAX_ZIP_ENTRIES,
                     max_directory_bytes: int = MAX_CENTRAL_DIRECTORY_BYTES) -> zipfile.ZipFile:
    """A ZipFile, after checking from the raw bytes that its directory is small. Raises
    ValueError (not a zip) or DataError (too many entries)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        entries, cd_size = zip_directory_size(fh, size)
    if entries > max_entries or cd_size > max_directory_bytes:
        raise DataError(
            f"{path.name!r} is a zip of {entries} entries ({cd_size} bytes of directory), above "
            f"the limit of {max_entries}; keep only the arrays in it")
    return zipfile.ZipFile(path)


# ---------------------------------------------------------------------------------------------
# Checks shared by the streaming validator and the loader


def _check_dtype(dtype: np.dtype, key: str, role: str) -> None:
    if dtype.hasobject:
        raise DataError(
            f"array {key!r} is an object array, which is not allowed (it would need "
            f"unpickling); store a numeric array, e.g. np.asarray({key}, dtype=np.float32)")
    if role == "x" and (dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None):
        raise DataError(
            f"{key!r} must be numeric (int, uint, float or bool), got dtype {dtype}; "
            f"convert it with {key}.astype(np.float32)")
    if role == "y" and (dtype.kind not in "iuf" or dtype.fields is not None):
        raise DataError(
            f"{key!r} must hold integer class labels, got dtype {dtype}; "
            f"save {key}.astype(np.int64)")


def _check_x_shape(shape: tuple[int, ...], key: str) -> None:
    if not 2 <= len(shape) <= 4:
        raise DataError(
            f"{key!r} must have shape (N, D), (N, H, W) or (N, C, H, W), got {shape}")
    if any(d == 0 for d in shape[1:]):
        raise DataError(
            f"{key!r} of shape {shape} has samples of 0 features; every sample needs at least "
            "one value per axis")
    if len(shape) == 4 and shape[1] > 4 and shape[-1] <= 4:
        # Channels-last images would silently train as nonsense; refuse with the fix.
        raise DataError(
            f"{key!r} of shape {shape} looks channels-last (N, H, W, C); images must be "
            f"(N, C, H, W): save {key}.transpose(0, 3, 1, 2)")


def _check_y_shape(shape: tuple[int, ...], key: str, n_samples: int, x_key: str) -> None:
    if len(shape) != 1:
        raise DataError(
            f"{key!r} must be 1-D class labels of shape (N,), got {shape}; "
            f"save {key}.ravel() (or argmax of one-hot labels)")
    if shape[0] != n_samples:
        raise DataError(
            f"{key!r} has {shape[0]} labels but {x_key!r} has {n_samples} samples; "
            "they must have the same length")


def _check_x_values(x: np.ndarray, key: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(
            f"{key!r} contains NaN or infinite values; replace them (e.g. np.nan_to_num) "
            "or drop those samples")


class _LabelRange:
    """Min and max of labels seen so far, checked on the original dtype (before any int64
    cast: uint64 2**64-1 or float 1e19 would wrap or overflow there)."""

    def __init__(self, key: str, max_classes: int):
        self.key, self.max_classes = key, max_classes
        self.low: float | int | None = None
        self.high: float | int | None = None

    def add(self, y: np.ndarray) -> None:
        if not len(y):
            return
        if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise DataError(
                f"{self.key!r} must hold integer class labels, got non-integral floats; "
                f"save {self.key}.astype(np.int64)")
        low, high = y.min().item(), y.max().item()
        if low < 0:
            raise DataError(
                f"{self.key!r} has negative label {low:g}; labels must be 0 .. num_classes-1")
        if high >= self.max_classes:
            raise DataError(
                f"{self.key!r} has label {high:g}, above the limit of {self.max_classes} "
                "classes; labels must be 0 .. num_classes-1")
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)


def _summary(shapes: dict[str, tuple[int, ...]], y_range: _LabelRange,
             test_range: _LabelRange | None) -> NpzSummary:
    n_train = shapes["x"][0]
    if n_train < MIN_TRAIN_SAMPLES:
        raise DataError(
            f"'x' has {n_train} samples; at least {MIN_TRAIN_SAMPLES} are needed to train and "
            "to estimate anything")
    num_classes = int(y_range.high) + 1
    if num_classes < 2:
        raise DataError("'y' holds a single class (0); classification needs at least 2 classes")
    n_test = 0
    if test_range is not None:
        n_test = shapes["x_test"][0]
        if n_test == 0:
            raise DataError("'x_test' is empty; drop x_test/y_test or give at least one sample")
        if test_range.high >= num_classes:
            raise DataError(
                f"'y_test' has label {int(test_range.high)} but 'y' only has labels 0 .. "
                f"{num_classes - 1}; test labels must be classes seen in training")
    x_shape = shapes["x"]
    input_shape = x_shape[1:] if len(x_shape) != 3 else (1, *x_shape[1:])
    return NpzSummary(n_train=n_train, n_test=n_test, input_shape=tuple(input_shape),
                      num_classes=num_classes, has_test=n_test > 0)


def _wanted_keys(keys: set[str], path: Path) -> list[str]:
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
    return ["x", "y"] + (["x_test", "y_test"] if "x_test" in keys else [])


def _check_shapes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
    for key in shapes:
        _check_dtype(dtypes[key], key, "y" if key.startswith("y") else "x")
    _check_x_shape(shapes["x"], "x")
    _check_y_shape(shapes["y"], "y", shapes["x"][0], "x")
    if "x_test" in shapes:
        _check_x_shape(shapes["x_test"], "x_test")
        if shapes["x_test"][1:] != shapes["x"][1:]:
            raise DataError(
                f"'x_test' samples have shape {shapes['x_test'][1:]} but 'x' samples have "
                f"{shapes['x'][1:]}; both must share the per-sample shape")
        _check_y_shape(shapes["y_test"], "y_test", shapes["x_test"][0], "x_test")


# ---------------------------------------------------------------------------------------------
# Streaming validation (the API)


@dataclass(frozen=True)
class _Member:
    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    data_bytes: int


def _member_name(names: set[str], key: str) -> str:
    return f"{key}.npy" if f"{key}.npy" in names else key


def _read_header(fh: BinaryIO, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) from a member's .npy header (at most ~10 kB is read)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)) and hasattr(fmt, "_read_array_header"):
            shape, _fortran, dtype = fmt._read_array_header(fh, version)
        elif version == (2, 0):
            shape, _fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"array {key!r} in {path.name!r} is damaged ({str(exc)[:200]}); save it again"
        ) from None
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"array {key!r} in {path.name!r} has an invalid shape {shape}")
    return tuple(shape), dtype, fh.tell()


def _inspect(zf: zipfile.ZipFile, key: str, path: Path) -> _Member:
    names = set(zf.namelist())
    info = zf.getinfo(_member_name(names, key))
    with zf.open(info) as fh:
        shape, dtype, header_bytes = _read_header(fh, key, path)
    _check_dtype(dtype, key, "y" if key.startswith("y") else "x")
    data_bytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_bytes + data_bytes:
        raise DataError(
            f"array {key!r} in {path.name!r} is damaged: its header says {shape} of {dtype} "
            f"({data_bytes} bytes) but the zip declares {info.file_size - header_bytes}; "
            "save it again")
    if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise DataError(
            f"array {key!r} in {path.name!r} inflates {info.file_size // max(info.compress_size, 1)}"
            f" times (from {info.compress_size} to {info.file_size} bytes), above the limit of "
            f"{MAX_RATIO}: refused as a likely zip bomb; save with numpy.savez (uncompressed)")
    return _Member(key, info, shape, dtype, data_bytes)


def _chunks(zf: zipfile.ZipFile, member: _Member, path: Path) -> Iterator[np.ndarray]:
    """The member's values in chunks of about CHUNK_BYTES, inflated as they are read; stops
    at the declared size (zipfile never inflates past it) and checks the CRC at the end."""
    itemsize = member.dtype.itemsize
    step = max(itemsize, CHUNK_BYTES // itemsize * itemsize)
    seen = 0
    try:
        with zf.open(member.info) as fh:
            _read_header(fh, member.key, path)
            carry = b""
            while seen < member.data_bytes:
                block = fh.read(min(step, member.data_bytes - seen))
                if not block:
                    break
                seen += len(block)
                if carry:  # a value split across two reads (zipfile may return short reads)
                    block = carry + block
                count = len(block) // itemsize
                carry = block[count * itemsize:]
                if count:
                    yield np.frombuffer(block, dtype=member.dtype, count=count)
            if fh.read(1):
                raise DataError(f"array {member.key!r} in {path.name!r} has trailing bytes")
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"array {member.key!r} in {path.name!r} is damaged ({str(exc)[:200]}); save it again"
        ) from None
    if seen != member.data_bytes:
        raise DataError(
            f"array {member.key!r} in {path.name!r} is truncated ({seen} of "
            f"{member.data_bytes} bytes); save it again")


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise DataError(f"dataset file {path.name!r} does not exist")
    try:
        return open_bounded_zip(path)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _not_npz(path, str(exc)[:100]) from None


def validate_npz(path: str | Path, max_classes: int = 10_000,
                 max_bytes: int = MAX_BYTES) -> NpzSummary:
    """Check an uploaded .npz dataset in bounded memory without unpickling anything; return
    what it holds.

    Raises DataError (naming the array key and the fix) for: not a .npz (or a zip of more
    than MAX_ZIP_ENTRIES entries), object arrays, missing x/y, x_test without y_test (or the
    reverse), non-numeric x, NaN/inf in x, x not (N, D)/(N, H, W)/(N, C, H, W) or with a
    0-sized sample axis, y not 1-D integral labels, len(x) != len(y), labels negative or at
    or above `max_classes` (checked before any cast), fewer than 20 training samples, fewer
    than 2 classes, test samples of another shape or with unseen labels, arrays larger than
    `max_bytes` uncompressed or a member inflating more than MAX_RATIO times (both checked
    from the headers, before inflating), a header that disagrees with the zip's sizes.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        keys = {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
        wanted = _wanted_keys(keys, path)
        members = {key: _inspect(zf, key, path) for key in wanted}
        _check_total(path, sum(m.info.file_size for m in members.values()), max_bytes)
        shapes = {k: m.shape for k, m in members.items()}
        _check_shapes(shapes, {k: m.dtype for k, m in members.items()})
        ranges = {k: _LabelRange(k, max_classes) for k in wanted if k.startswith("y")}
        for key, member in members.items():
            for chunk in _chunks(zf, member, path):
                if key in ranges:
                    ranges[key].add(chunk)
                else:
                    _check_x_values(chunk, key)
        summary = _summary(shapes, ranges["y"], ranges.get("y_test"))
        names = _class_names(zf, keys, path, summary.num_classes)
    return dataclasses.replace(summary, class_names=names)


MAX_CLASS_NAMES_BYTES = 1 << 20


def _class_names(zf: zipfile.ZipFile, keys: set[str], path: Path,
                 num_classes: int) -> tuple[str, ...] | None:
    """The optional `class_names` array: 1-D strings, one per class (checked from its header
    and sizes before it is read)."""
    if "class_names" not in keys:
        return None
    info = zf.getinfo(_member_name(set(zf.namelist()), "class_names"))
    fix = "save np.array(['cat', 'dog', ...]) as class_names, one name per class"
    with zf.open(info) as fh:
        shape, dtype, _ = _read_header(fh, "class_names", path)
    if dtype.kind != "U" or len(shape) != 1 or shape[0] < num_classes or \
            info.file_size > MAX_CLASS_NAMES_BYTES:
        raise DataError(
            f"'class_names' in {path.name!r} must be a 1-D array of at least {num_classes} "
            f"strings (under {MAX_CLASS_NAMES_BYTES} bytes), got {dtype} {shape}; {fix}")
    try:
        with zf.open(info) as fh:
            names = np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"'class_names' in {path.name!r} is damaged ({str(exc)[:200]})") \
            from None
    return tuple(str(v) for v in names)


def _check_total(path: Path, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise DataError(
            f"{path.name!r} holds {total / 2**30:.1f} GiB of arrays once uncompressed, above "
            f"the limit of {max_bytes / 2**30:.1f} GiB; upload a subset of the samples")


# ---------------------------------------------------------------------------------------------
# Loading whole arrays (the worker)


def load_npz_arrays(path: str | Path, max_classes: int = 10_000,
                    max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """Validated arrays of an upload: x, y (int64), and x_test, y_test (int64) when present.

    x keeps its stored dtype and shape; raises DataError as `validate_npz` (same checks, on
    whole arrays: the worker needs them in memory anyway).
    """
    path = Path(path)
    with _open_zip(path) as zf:
        keys = {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
        wanted = _wanted_keys(keys, path)
        members = {key: _inspect(zf, key, path) for key in wanted}
        _check_total(path, sum(m.info.file_size for m in members.values()), max_bytes)
        _check_shapes({k: m.shape for k, m in members.items()},
                      {k: m.dtype for k, m in members.items()})
        arrays = {}
        for key, member in members.items():
            try:
                with zf.open(member.info) as fh:
                    arrays[key] = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(
                    f"array {key!r} in {path.name!r} is damaged ({str(exc)[:200]}); save it again"
                ) from None
    ranges = {k: _LabelRange(k, max_classes) for k in wanted if k.startswith("y")}
    for key, array in arrays.items():
        if key in ranges:
            ranges[key].add(array)
        else:
            _check_x_values(array, key)
    summary = _summary({k: a.shape for k, a in arrays.items()}, ranges["y"],
                       ranges.get("y_test"))
    with _open_zip(path) as zf:
        names = _class_names(zf, keys, path, summary.num_classes)
    if names is not None:
        arrays["class_names"] = np.array(names)
    for key in ranges:
        arrays[key] = arrays[key].astype(np.int64)
    return arrays
