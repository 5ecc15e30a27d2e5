"""Hostile upload files, built in memory (no torch needed): pickles that reach os.system
past a naive opcode scan, zip bombs, malformed safetensors and bad labels.

Each pickle here is a real attack: `would_import` runs Python's own unpickler with a
find_class that records the requested global and stops, proving what the file would import.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib

import numpy as np

# ---------------------------------------------------------------------------------------------
# Pickles (the payload of a torch.save zip's data.pkl)


def _u(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _s(text: str) -> bytes:  # SHORT_BINSTRING (protocol 1, a str in Python 3)
    raw = text.encode()
    return b"U" + bytes([len(raw)]) + raw


CALL_ID = _u("id") + b"\x85R."  # ("id",) TUPLE1, REDUCE, STOP

BAD_PICKLES: dict[str, tuple[bytes, str]] = {
    # name: (pickle bytes, the global it imports)
    "global": (b"\x80\x02cos\nsystem\n" + CALL_ID, "os.system"),
    # The names go into the memo, decoy allowed names follow, then BINGET brings the real
    # ones back for STACK_GLOBAL: a scanner that takes the last two strings sees the decoys.
    "memo_binget": (
        b"\x80\x04" + _u("os") + b"\x94" + _u("system") + b"\x94" + b"00"
        + _u("torch") + _u("FloatStorage") + b"00"
        + b"h\x00h\x01\x93" + CALL_ID,
        "os.system",
    ),
    # Protocol-1 string opcodes (SHORT_BINSTRING) feeding STACK_GLOBAL.
    "old_strings": (b"\x80\x04" + _s("os") + _s("system") + b"\x93" + CALL_ID, "os.system"),
    # Protocol-0 STRING opcodes, PUT/GET memo.
    "protocol0_memo": (b"S'posix'\np0\n0S'system'\np1\n0g0\ng1\n\x93(S'id'\ntR.", "posix.system"),
    # INST imports and calls in one opcode.
    "inst": (b"(S'id'\nios\nsystem\n.", "os.system"),
    # Names a prefix allow-list ("numpy", "torch") admitted.
    "prefix_numpy": (b"\x80\x02cnumpy.testing._private.utils\nrunstring\n" + CALL_ID,
                     "numpy.testing._private.utils.runstring"),
    "prefix_torch_hub": (b"\x80\x02ctorch.hub\nload\n" + CALL_ID, "torch.hub.load"),
    "builtins_eval": (b"\x80\x02c__builtin__\neval\n" + CALL_ID, "__builtin__.eval"),
}


def would_import(data: bytes) -> str:
    """The first global Python's unpickler would import from `data` (nothing is imported)."""

    class Found(Exception):
        pass

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            raise Found(f"{module}.{name}")

    try:
        Recorder(io.BytesIO(data)).load()
    except Found as found:
        return str(found)
    raise AssertionError("the pickle imports nothing")


def torch_zip(pickle_bytes: bytes, extra: dict[str, bytes] | None = None,
              folder: str = "archive") -> bytes:
    """A zip laid out like torch.save's, with `pickle_bytes` as its data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{folder}/data.pkl", pickle_bytes)
        zf.writestr(f"{folder}/byteorder", b"little")
        zf.writestr(f"{folder}/version", b"3\n")
        for name, content in (extra or {}).items():
            zf.writestr(name, content)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Zip bombs and bad .npz


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_bomb(inflated_bytes: int, declared_bytes: int | None = None) -> bytes:
    """An .npz whose x.npy is `inflated_bytes` of zeros deflated to about 1/1000 of that.
    `declared_bytes`: the size the zip's directory claims for x.npy (default: the truth);
    its .npy header always tells the truth."""
    n_features = 64
    rows = inflated_bytes // (4 * n_features)
    header = _npy_header((rows, n_features))
    body = io.BytesIO()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    body.write(comp.compress(header))
    zeros = bytes(4 * 2**20)
    left = rows * n_features * 4
    crc = zlib.crc32(header)
    while left:
        part = zeros[: min(left, len(zeros))]
        body.write(comp.compress(part))
        crc = zlib.crc32(part, crc)
        left -= len(part)
    body.write(comp.flush())
    size = len(header) + rows * n_features * 4 if declared_bytes is None else declared_bytes
    y = io.BytesIO()
    np.save(y, np.arange(40) % 2)
    return _zip_with_raw_member("x.npy", body.getvalue(), size, crc, {"y.npy": y.getvalue()})


def _zip_with_raw_member(name: str, deflated: bytes, size: int, crc: int,
                         others: dict[str, bytes]) -> bytes:
    """A zip (deflate, zip64 sizes) whose `name` entry declares `size` and `crc` and holds
    `deflated` as its compressed data; `others` are stored normally."""
    out = io.BytesIO()
    raw_name = name.encode()
    zip64 = struct.pack("<HHQQ", 1, 16, size, len(deflated))
    local = struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 45, 0, 8, 0, 0, crc,
                        0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), len(zip64))
    out.write(local + raw_name + zip64 + deflated)
    central_zip64 = struct.pack("<HHQQQ", 1, 24, size, len(deflated), 0)
    central = [struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 45, 45, 0, 8, 0, 0, crc,
                           0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), len(central_zip64), 0, 0, 0, 0,
                           0xFFFFFFFF) + raw_name + central_zip64]
    for other, content in others.items():
        offset = out.tell()
        other_name = other.encode()
        c = zlib.crc32(content)
        out.write(struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, 0, 0, 0, 0, c, len(content),
                              len(content), len(other_name), 0) + other_name + content)
        central.append(struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 20, 20, 0, 0, 0, 0,
                                   c, len(content), len(content), len(other_name), 0, 0, 0, 0,
                                   0, offset) + other_name)
    cd_at = out.tell()
    for entry in central:
        out.write(entry)
    cd_size = out.tell() - cd_at
    out.write(struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(central), len(central),
                          cd_size, cd_at, 0))
    return out.getvalue()


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def many_entries_zip(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"a{i}.npy", b"")
    return buf.getvalue()


_X = np.zeros((40, 4), np.float32)
_Y = np.arange(40) % 2

BAD_NPZ: dict[str, tuple[bytes, str]] = {
    "labels_uint64_max": (npz_bytes(x=_X, y=np.array([2**64 - 1] + [0, 1] * 19 + [1], np.uint64)),
                          "above the limit of"),
    "labels_float_1e19": (npz_bytes(x=_X, y=np.array([1e19] + [0.0, 1.0] * 19 + [1.0])),
                          "above the limit of"),
    "zero_features": (npz_bytes(x=np.zeros((40, 0), np.float32), y=_Y), "0 features"),
    "nan_x": (npz_bytes(x=np.full((40, 4), np.nan, np.float32), y=_Y), "NaN"),
    "object_x": (npz_bytes(x=np.array([[{}]] * 40, dtype=object), y=_Y), "object array"),
    "structured_x": (npz_bytes(x=np.zeros(40, dtype=[("a", "<f4"), ("b", "<i4")]).reshape(40, 1),
                               y=_Y), "numeric"),
    "many_entries": (many_entries_zip(12_000), "entries"),
}


# ---------------------------------------------------------------------------------------------
# Malformed safetensors


def safetensors_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _t(begin: int, end: int, shape: list[int], dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BAD_SAFETENSORS: dict[str, tuple[bytes, str]] = {
    "overlap": (safetensors_bytes({"a": _t(0, 16, [4]), "b": _t(8, 24, [4])}, bytes(24)),
                "overlaps"),
    "gap": (safetensors_bytes({"a": _t(0, 16, [4]), "b": _t(20, 36, [4])}, bytes(36)), "gap"),
    "shape_vs_bytes": (safetensors_bytes({"a": _t(0, 16, [8])}, bytes(16)), "span 16 bytes"),
    "trailing_bytes": (safetensors_bytes({"a": _t(0, 16, [4])}, bytes(32)), "cover 16"),
    "deep_header": (safetensors_bytes(b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                      bytes(0)), "nested too deeply"),
    "deep_tensor": (safetensors_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                      bytes(0)), "nested too deeply"),
    "duplicate_key": (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": '
                                        b'[0, 16]}, "a": {"dtype": "F32", "shape": [4], '
                                        b'"data_offsets": [0, 16]}}', bytes(16)), "duplicate"),
    "not_utf8": (safetensors_bytes(b'{"\xff": 1}', bytes(0)), "corrupt safetensors header"),
    "huge_header_len": (safetensors_bytes({"a": _t(0, 4, [1])}, bytes(4), header_len=2**63),
                        "not a safetensors file"),
    "bool_shape": (safetensors_bytes({"a": _t(0, 4, [True, 4], "U8")}, bytes(4)), "malformed"),
    "bad_metadata": (safetensors_bytes({"__metadata__": {"k": 1}, "a": _t(0, 4, [1])}, bytes(4)),
                     "metadata"),
    "extra_field": (safetensors_bytes({"a": {**_t(0, 4, [1]), "x": 1}}, bytes(4)),
                    "exactly dtype"),
}
