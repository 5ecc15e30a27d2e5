"""Checks on uploaded files that need neither torch nor unpickling.

Each check raises `InvalidUpload` with a message naming the file and the problem, so the
route answers 422 before anything is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import InvalidUpload, TooLarge
from app.pickle_scan import PickleRefused, pickle_globals

CHUNK = 1024 * 1024


@dataclass
class SavedUpload:
    path: Path
    size_bytes: int
    sha256: str


def save_upload(src: BinaryIO, dest: Path, max_bytes: int, what: str) -> SavedUpload:
    """Copy `src` to `dest`, counting bytes and hashing; TooLarge past `max_bytes`."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"{what} is larger than the limit of {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidUpload(f"{what} is empty")
    return SavedUpload(dest, size, digest.hexdigest())


# Bits per element, as the safetensors format defines them (sub-byte types count in bits).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# The header is parsed into Python objects (~15x its size in memory); the zoo's largest
# state_dict (ResNet-56, ~340 tensors) has a ~40 kB header.
MAX_SAFETENSORS_HEADER = 1024 * 1024
MAX_TENSORS = 10_000
MAX_PICKLE_BYTES = 16 * 1024 * 1024  # data.pkl of a state_dict: ~200 bytes per tensor
MAX_PT_ENTRIES = 20_000  # one zip entry per tensor storage


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def check_safetensors(path: Path, filename: str) -> dict[str, Any]:
    """Check a safetensors file as the safetensors library does when the worker loads it:
    an 8-byte length, a JSON object header (UTF-8, no duplicate keys, `__metadata__` of
    strings only), known dtypes, and tensors whose byte ranges have exactly shape x dtype
    bytes and tile the data section: contiguous, non-overlapping, no gaps, nothing after."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidUpload(f"{filename}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len < 2 or header_len > size - 8:
            raise InvalidUpload(
                f"{filename}: not a safetensors file (header length {header_len} does not fit "
                f"a {size}-byte file); upload weights saved with safetensors.torch.save_file"
            )
        if header_len > MAX_SAFETENSORS_HEADER:
            raise InvalidUpload(
                f"{filename}: the safetensors header is {header_len} bytes, above the limit of "
                f"{MAX_SAFETENSORS_HEADER}; the zoo's models need a few kB"
            )
        raw = fh.read(header_len)
    if not raw.startswith(b"{"):
        raise InvalidUpload(f"{filename}: corrupt safetensors header (does not start with '{{')")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidUpload(f"{filename}: corrupt safetensors header ({str(exc)[:200]})") from None
    except RecursionError:
        raise InvalidUpload(f"{filename}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise InvalidUpload(f"{filename}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidUpload(f"{filename}: __metadata__ must map strings to strings")
    if not header:
        raise InvalidUpload(f"{filename}: the safetensors file holds no tensors")
    if len(header) > MAX_TENSORS:
        raise InvalidUpload(f"{filename}: {len(header)} tensors, above the limit of {MAX_TENSORS}")
    data_len = size - 8 - header_len
    tensors: dict[str, Any] = {}
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidUpload(
                f"{filename}: tensor {name!r} must have exactly dtype, shape and data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise InvalidUpload(f"{filename}: tensor {name!r} has unknown dtype {str(dtype)[:40]!r}")
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise InvalidUpload(f"{filename}: tensor {name!r} has a malformed shape or offsets")
        bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise InvalidUpload(
                f"{filename}: tensor {name!r} is {shape} of {dtype} ({bits / 8:g} bytes) but "
                f"its data_offsets span {offsets[1] - offsets[0]} bytes"
            )
        if offsets[1] > data_len:
            raise InvalidUpload(
                f"{filename}: truncated or corrupt: tensor {name!r} ends at byte {offsets[1]} "
                f"of a {data_len}-byte data section"
            )
        extents.append((offsets[0], offsets[1], name))
        tensors[name] = {"dtype": dtype, "shape": shape}
    position = 0
    for begin, end, name in sorted(extents):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise InvalidUpload(
                f"{filename}: corrupt safetensors file: tensor {name!r} at bytes {begin}-{end} "
                f"{what} (expected it to start at {position}); save it again"
            )
        position = end
    if position != data_len:
        raise InvalidUpload(
            f"{filename}: corrupt safetensors file: the data section is {data_len} bytes but "
            f"the tensors cover {position}"
        )
    return {"tensors": tensors, "num_tensors": len(tensors)}


def check_state_dict_pt(path: Path, filename: str) -> dict[str, Any]:
    """Check a torch.save zip without unpickling: one archive folder with one data.pkl whose
    opcode stream, replayed symbolically with its memo (app.pickle_scan), imports only the
    exact globals a state_dict of dense tensors needs. TorchScript archives are refused."""
    from mipp.errors import DataError
    from mipp.npz import open_bounded_zip

    not_pt = (
        f"{filename}: not a torch.save file (expected a zip archive, as torch>=1.6 writes); "
        "re-save with torch.save(model.state_dict(), path) or use safetensors"
    )
    try:
        zf = open_bounded_zip(path, max_entries=MAX_PT_ENTRIES)
    except DataError as exc:
        raise InvalidUpload(f"{filename}: {exc}") from None
    except (ValueError, OSError, zipfile.BadZipFile):
        raise InvalidUpload(not_pt) from None
    try:
        with zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                raise InvalidUpload(f"{filename}: the zip holds two entries of one name")
            folders = {n.split("/", 1)[0] for n in names}
            pkl_names = [n for n in names if n.endswith("/data.pkl")]
            if len(folders) != 1 or len(pkl_names) != 1 or pkl_names[0].count("/") != 1:
                raise InvalidUpload(
                    f"{filename}: expected one archive folder with one data.pkl (as torch.save "
                    f"writes); found {len(pkl_names)} data.pkl in {len(folders)} folders"
                )
            folder = pkl_names[0].split("/", 1)[0]
            if any(n in names for n in (f"{folder}/constants.pkl", f"{folder}/code/")) or any(
                n.startswith(f"{folder}/code/") for n in names
            ):
                raise InvalidUpload(
                    f"{filename}: a TorchScript archive (it holds code), not a state_dict; "
                    "upload torch.save(model.state_dict(), path) or safetensors"
                )
            info = zf.getinfo(pkl_names[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise InvalidUpload(
                    f"{filename}: data.pkl is {info.file_size} bytes, above the limit of "
                    f"{MAX_PICKLE_BYTES}; a state_dict's is a few kB"
                )
            with zf.open(info) as fh:  # read as the replay goes, never whole
                refs = pickle_globals(io.BufferedReader(fh, CHUNK))
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise InvalidUpload(f"{filename}: corrupt zip archive ({str(exc)[:200]})") from None
    except PickleRefused as exc:
        what = (f"the pickle refers to {exc.global_name}, which a plain state_dict never does"
                if exc.global_name else f"refused pickle: {exc}")
        raise InvalidUpload(
            f"{filename}: {what}; upload weights only (model.state_dict()) or safetensors"
        ) from None
    return {"pickle_refs": refs}


def check_npz(path: Path, filename: str) -> dict[str, Any]:
    """Validate a dataset archive with the engine's numpy-only checker (never unpickles)."""
    from mipp.errors import DataError
    from mipp.npz import validate_npz

    try:
        summary = validate_npz(path)
    except DataError as exc:
        raise InvalidUpload(f"{filename}: {exc}") from None
    return _jsonable(summary)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return _jsonable(obj.model_dump())
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    return obj
