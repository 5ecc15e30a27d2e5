"""`mipp admin create-user` and `mipp serve` (the embedded default), as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _pythonpath() -> str:
    """PYTHONPATH for child processes: this checkout first, then what the caller had."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
pytestmark = pytest.mark.integration


def _mipp(*args: str) -> list[str]:
    # The installed console script when present, else the same entry point via -c.
    return [sys.executable, "-c", "import sys; from mipp.cli import main; sys.exit(main())", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_register_adds_serve_and_admin():
    import argparse

    from app.cli import register

    parser = argparse.ArgumentParser(prog="mipp")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--data-dir", "/tmp/x", "--port", "9000"])
    assert args.func.__name__ == "cmd_serve" and args.port == 9000
    args = parser.parse_args(["admin", "create-user", "alice", "--admin"])
    assert args.func.__name__ == "cmd_create_user" and args.admin and args.name == "alice"


def test_serve_embedded_default(tmp_path):
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "MIPP_DATA_DIR": str(tmp_path / "data")}
    # Admin commands never create a database; `admin migrate` (or `serve`) does.
    migrated = subprocess.run(_mipp("admin", "migrate"), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    created = subprocess.run(_mipp("admin", "create-user", "alice"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("mipp_")
    again = subprocess.run(_mipp("admin", "create-user", "alice"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr

    port = _free_port()
    serve = subprocess.Popen(_mipp("serve", "--port", str(port)), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                # The worker too: Ctrl-C must find it running, not still importing torch.
                if ready.status_code == 200 and any(" ready." in line for line in lines):
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.3)
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/users/me",
                       headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert me.json()["name"] == "alice"
        assert (tmp_path / "data" / "mipp.db").exists()
        assert (tmp_path / "data" / "broker" / "queue").is_dir()
        serve.send_signal(signal.SIGINT)  # what Ctrl-C sends
        serve.wait(40)
        reader.join(10)
        output = "".join(lines)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, output
    assert f"http://127.0.0.1:{port}/docs" in output and "mipp admin create-user" in output
    assert "Warm shutdown" in output  # the worker was stopped, not orphaned
