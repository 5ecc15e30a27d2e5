"""Peak memory of the API process for large and hostile uploads.

    .venv/bin/python bench/bench_upload_rss.py [--gib 1] [--worst-gib 8]
    .venv/bin/python bench/bench_upload_rss.py --report      # table from the raw results only

For each case a fresh API process (`uvicorn app.main:create_app --factory`, one process,
embedded setup: SQLite + local store) gets one upload over HTTP (streamed from a file, as
curl -F does); the script reads the process's VmRSS before and VmHWM (its peak resident set)
after, and the answer and its time. Cases:
- a valid `--gib` GiB .npz (uncompressed float32, accepted and stored);
- a classic zip bomb: 1 GiB of zeros in ~1 MB (refused from its headers: ratio);
- a bomb declaring 64 GiB (refused from its headers: ratio and total);
- the worst bomb the header checks let through: `--worst-gib` GiB of arrays in all (x and
  its labels y; the uncompressed limit, 8 GiB, counts both) inflating just under the ratio
  limit, so the API streams all of it;
- a .pt whose pickle is 16 MiB of MARK opcodes (refused by the replay's stack cap);
- a safetensors header of 1 MiB (the header limit).
Each row is appended to bench/results/upload_rss.jsonl; the table is `--report`'s output.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "upload_rss.jsonl"
sys.path.insert(0, str(REPO))


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _zip_member(zf_out, name: str, deflated_parts, size: int, crc: int,
                entries: list) -> None:
    """Write one deflated member with zip64 sizes into the open file `zf_out`."""
    offset = zf_out.tell()
    raw = name.encode()
    extra = struct.pack("<HHQQ", 1, 16, size, 0)  # compressed size patched below
    zf_out.write(struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 45, 0, 8, 0, 0, crc,
                             0xFFFFFFFF, 0xFFFFFFFF, len(raw), len(extra)) + raw + extra)
    start = zf_out.tell()
    for part in deflated_parts:
        zf_out.write(part)
    compressed = zf_out.tell() - start
    zf_out.seek(offset + 30 + len(raw) + 4)
    zf_out.write(struct.pack("<QQ", size, compressed))
    zf_out.seek(0, os.SEEK_END)
    entries.append((raw, crc, size, compressed, offset))


def _finish_zip(fh, entries: list) -> None:
    cd_at = fh.tell()
    for raw, crc, size, compressed, offset in entries:
        extra = struct.pack("<HHQQQ", 1, 24, size, compressed, offset)
        fh.write(struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 45, 45, 0, 8, 0, 0, crc,
                             0xFFFFFFFF, 0xFFFFFFFF, len(raw), len(extra), 0, 0, 0, 0,
                             0xFFFFFFFF) + raw + extra)
    cd_size = fh.tell() - cd_at
    fh.write(struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                         cd_size, cd_at, 0))


def repeated_deflate(block: bytes, times: int, header: bytes,
                     exact_crc: bool = True) -> tuple[list[bytes], int, int]:
    """A raw deflate stream of header + block x times, built from one compressed copy of
    the block (a full flush makes each copy independent); (parts, size, crc). Without
    `exact_crc` the CRC is left wrong (for bombs refused before they are inflated)."""
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    head = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    one = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(times if exact_crc else 0):
        crc = zlib.crc32(block, crc)
    return [head, *([one] * times), tail], len(header) + len(block) * times, crc


def make_bomb(path: Path, inflated: int, random_every: int | None,
              fit_total: bool = False) -> None:
    """x.npy: float32 (rows, 1024) of zeros (random_every None: the highest ratio) or zeros
    with 8 random floats in [0, 1) per `random_every` bytes (a ratio under the API's limit,
    finite values: a valid dataset the API must inflate to the end). x holds `inflated`
    bytes, or with `fit_total` x and its int64 labels y together hold at most `inflated`
    (the API's limit counts every array: the largest upload its headers let through)."""
    values = np.zeros(2**20, np.float32)  # 4 MiB: 1024 rows
    if random_every:
        noise = np.random.default_rng(0).random(len(values), np.float32)
        for at in range(0, len(values), random_every // 4):
            values[at:at + 8] = noise[at:at + 8]
    block = values.tobytes()
    # 4096 + 8 bytes per row (x, y), whole 4 MiB blocks, 4 KiB left for the .npy headers.
    rows = (inflated - 4096) // (4096 + 8) // 1024 * 1024 if fit_total else inflated // 4096
    times = rows * 4096 // len(block)
    parts, size, crc = repeated_deflate(block, times, _npy_header((rows, 1024)),
                                        exact_crc=random_every is not None)
    y = io.BytesIO()
    np.lib.format.write_array(y, np.arange(rows, dtype=np.int64) % 2)
    y_raw = y.getvalue()
    entries: list = []
    with open(path, "wb") as fh:
        _zip_member(fh, "x.npy", parts, size, crc, entries)
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        _zip_member(fh, "y.npy", [comp.compress(y_raw) + comp.flush()], len(y_raw),
                    zlib.crc32(y_raw), entries)
        _finish_zip(fh, entries)


def make_valid_npz(path: Path, gib: float) -> None:
    rows = int(gib * 2**30) // (4 * 256)
    block = np.random.default_rng(0).random((4096, 256), np.float32)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header((rows, 256)))
            left = rows
            while left:
                part = block[: min(left, len(block))]
                fh.write(part.tobytes())
                left -= len(part)
        with zf.open("y.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.arange(rows, dtype=np.int64) % 10)


def make_mark_pickle(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + b"(" * (16 * 2**20 - 8) + b".")


def make_big_safetensors(path: Path) -> None:
    header, n, size = {}, 0, 2
    while size < 2**20 - 200:  # the running size: re-encoding the header each time is O(n^2)
        entry = {"dtype": "F32", "shape": [1], "data_offsets": [4 * n, 4 * n + 4]}
        header[f"layer{n}.weight"] = entry
        size += len(json.dumps({f"layer{n}.weight": entry})) - 2 + 2  # minus braces, plus ", "
        n += 1
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * n))


def start_api(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    import socket
    import urllib.request

    from app.db import migrate, session_scope
    from app.main import create_app  # noqa: F401 - fail here rather than in the child
    from app.security import create_user
    from app.settings import Settings

    settings = Settings(data_dir=tmp / "data", sweeper_interval_s=0,
                        max_upload_bytes=16 * 2**30)
    migrate(settings.database_url)
    from app.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        _user, key = create_user(session, f"rss-{time.time_ns()}")
    engine.dispose()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIPP_DATA_DIR": str(tmp / "data"),
           "MIPP_SWEEPER_INTERVAL_S": "0", "MIPP_MAX_UPLOAD_BYTES": str(16 * 2**30)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
         "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=REPO, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, base, key


def measure(case: str, route: str, path: Path, form: dict, tmp: Path) -> dict:
    import httpx

    proc, base, key = start_api(tmp)
    try:
        time.sleep(0.5)
        before = _status_kib(proc.pid, "VmRSS")
        start = time.perf_counter()
        with open(path, "rb") as fh:
            r = httpx.post(f"{base}/api/v1/{route}", headers={"Authorization": f"Bearer {key}"},
                           data=form, files={"file": (path.name, fh)}, timeout=600)
        seconds = time.perf_counter() - start
        peak = _status_kib(proc.pid, "VmHWM")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    body = r.json()
    return {"case": case, "upload_bytes": path.stat().st_size, "status": r.status_code,
            "answer": body.get("detail", body.get("id", ""))[:160], "seconds": round(seconds, 2),
            "rss_before_mib": round(before / 1024, 1), "peak_mib": round(peak / 1024, 1),
            "growth_mib": round((peak - before) / 1024, 1)}


def report(path: Path = RESULTS) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = ["| run | case | upload | answer | seconds | API RSS before -> peak (growth) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        size = r["upload_bytes"]
        shown = f"{size / 2**30:.2f} GiB" if size > 2**29 else f"{size / 2**20:.1f} MiB"
        answer = f"{r['status']}: {r['answer'][:90]}" if r["status"] >= 400 else f"{r['status']} stored"
        out.append(f"| {r['run']} | {r['case']} | {shown} | {answer} | {r['seconds']} | "
                   f"{r['rss_before_mib']} -> {r['peak_mib']} MiB (+{r['growth_mib']}) |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the valid upload")
    parser.add_argument("--worst-gib", type=float, default=8.0,
                        help="inflated size of the worst bomb the headers let through")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.report:
        print(report(args.results))
        return
    from mipp.npz import MAX_RATIO

    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = {"cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="mipp-rss-") as tmp_name:
        tmp = Path(tmp_name)
        # A 32-byte random run every `every` bytes keeps the ratio just under the limit.
        every = int(MAX_RATIO * 32 * 0.75)
        cases = [
            (f"valid .npz, {args.gib:g} GiB", "datasets", {},
             lambda p: make_valid_npz(p, args.gib)),
            ("zip bomb, 1 GiB of zeros", "datasets", {}, lambda p: make_bomb(p, 2**30, None)),
            ("zip bomb declaring 64 GiB", "datasets", {}, lambda p: make_bomb(p, 64 * 2**30, None)),
            (f"worst bomb the headers pass: {args.worst_gib:g} GiB of arrays at ratio < "
             f"{MAX_RATIO}", "datasets", {},
             lambda p: make_bomb(p, int(args.worst_gib * 2**30), every, fit_total=True)),
            (".pt pickle of 16 MiB of MARK opcodes", "models", {"arch": "mlp", "format": "pt"},
             make_mark_pickle),
            ("safetensors with a 1 MiB header", "models", {"arch": "mlp"}, make_big_safetensors),
        ]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for case, route, form, make in cases:
            path = tmp / ("upload.npz" if route == "datasets" else "upload.bin")
            make(path)
            row = {"run": run, "host": host, **measure(case, route, path, form, tmp)}
            path.unlink()
            with open(args.results, "a") as fh:  # append-only raw log
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(report(args.results))


if __name__ == "__main__":
    main()
