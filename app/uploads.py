"""Checks on uploaded files that need neither torch nor unpickling.

Each check raises `InvalidUpload` with a message naming the file and the problem, so the
route answers 422 before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import InvalidUpload, TooLarge

CHUNK = 1024 * 1024
SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
}  # fmt: skip
# Modules a torch.save'd state_dict refers to; anything else means code would run on load.
PT_ALLOWED_MODULES = ("torch", "collections", "_codecs", "numpy.core.multiarray", "numpy")
PT_ALLOWED_GLOBALS = {"builtins.set", "builtins.frozenset", "builtins.slice"}


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


def check_safetensors(path: Path, filename: str) -> dict[str, Any]:
    """Parse the safetensors header (8-byte length + JSON) and check every tensor's extent."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidUpload(f"{filename}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len == 0 or header_len > min(size - 8, 100 * 1024 * 1024):
            raise InvalidUpload(
                f"{filename}: not a safetensors file (header length {header_len} does not fit "
                f"a {size}-byte file); upload weights saved with safetensors.torch.save_file"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidUpload(f"{filename}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidUpload(f"{filename}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    tensors: dict[str, Any] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise InvalidUpload(f"{filename}: tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise InvalidUpload(f"{filename}: tensor {name!r} has unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidUpload(f"{filename}: tensor {name!r} has a malformed shape or offsets")
        if offsets[1] > data_len:
            raise InvalidUpload(
                f"{filename}: truncated or corrupt: tensor {name!r} ends at byte {offsets[1]} "
                f"of a {data_len}-byte data section"
            )
        end_max = max(end_max, offsets[1])
        tensors[name] = {"dtype": dtype, "shape": shape}
    if not tensors:
        raise InvalidUpload(f"{filename}: the safetensors file holds no tensors")
    if end_max != data_len:
        raise InvalidUpload(
            f"{filename}: corrupt safetensors file: the data section is {data_len} bytes but "
            f"the tensors cover {end_max}"
        )
    return {"tensors": tensors, "num_tensors": len(tensors)}


def check_state_dict_pt(path: Path, filename: str) -> dict[str, Any]:
    """Check a torch.save zip without unpickling: read the pickle's opcodes (pickletools
    executes nothing) and refuse references to anything a state_dict never needs."""
    if not zipfile.is_zipfile(path):
        raise InvalidUpload(
            f"{filename}: not a torch.save file (expected a zip archive, as torch>=1.6 writes); "
            "re-save with torch.save(model.state_dict(), path) or use safetensors"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl_names:
                raise InvalidUpload(f"{filename}: no data.pkl inside; not a torch.save file")
            with zf.open(pkl_names[0]) as fh:
                data = fh.read()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidUpload(f"{filename}: corrupt zip archive ({exc})") from None
    refs: set[str] = set()
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                refs.add(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                refs.add(f"{strings[-2]}.{strings[-1]}")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt pickle
        raise InvalidUpload(f"{filename}: corrupt pickle stream ({exc})") from None
    bad = sorted(
        r for r in refs if not r.startswith(PT_ALLOWED_MODULES) and r not in PT_ALLOWED_GLOBALS
    )
    if bad:
        raise InvalidUpload(
            f"{filename}: refers to {', '.join(bad[:5])}, which a plain state_dict never does; "
            "upload weights only (model.state_dict()) or safetensors"
        )
    return {"pickle_refs": sorted(refs)}


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
