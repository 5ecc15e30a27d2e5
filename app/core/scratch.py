"""Temporary folders under DATA/tmp, named so that abandoned ones can be told apart.

An API process spools uploads in `upload-<host>-<pid>-*` and a job process works in
`job-<host>-<pid>-*`. A process killed mid-upload or mid-job leaves its folder behind; every
API start, every maintenance round, every worker start and every job start removes the
folders of this host whose process is gone (a live process's folder is never touched).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("mipp.scratch")

KINDS = ("upload", "job")
_NAME = re.compile(r"^(?P<kind>upload|job)-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists on this host and is not a zombie (stopped counts as
    alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@contextmanager
def scratch_dir(tmp_dir: Path, kind: str) -> Iterator[Path]:
    """A fresh folder for this process, removed on exit (left behind only if killed)."""
    if kind not in KINDS:
        raise ValueError(f"scratch kind must be one of {KINDS}, not {kind!r}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix=f"{kind}-{_host()}-{os.getpid()}-") as tmp:
        yield Path(tmp)


def remove_abandoned(tmp_dir: Path, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Remove this host's scratch folders of `kinds` whose process is gone; returns names."""
    if not tmp_dir.is_dir():
        return []
    host, removed = _host(), []
    for entry in tmp_dir.iterdir():
        match = _NAME.match(entry.name)
        if match is None or match["kind"] not in kinds or match["host"] != host:
            continue
        if pid_alive(int(match["pid"])):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        log.warning("removed %d abandoned scratch folder(s) in %s: %s", len(removed), tmp_dir, removed)
    return removed
