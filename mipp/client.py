"""A Python client for the mipp service (httpx only: importing it never loads torch).

    from mipp.client import Client
    api = Client.from_config()                      # MIPP_URL / MIPP_API_KEY, else `mipp login`
    model = api.upload_model("mlp.safetensors", arch="mlp", config={"widths": [64, 32, 16]})
    data = api.upload_dataset("digits.npz")
    job = api.submit_job(model["id"], data["id"], {"target": 0.5})
    job = api.wait(job["id"], progress=print)       # print(phase, fraction, message)
    path = api.download_model(job["id"], "pruned/")  # unpacks model.tar.gz -> pruned/model

Every method returns the service's JSON as plain dicts and lists. A refused request raises
`ServiceError` with the HTTP status, the service's stable `code` and its message.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

API_PREFIX = "/api/v1"
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


class ServiceError(Exception):
    """The service refused a request (4xx/5xx) or could not be reached (status 0).

    `retry_after` (seconds) is set when the service said when to retry (a 429 rate limit)."""

    def __init__(self, status: int, detail: str, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code or 'error'}: {detail}" if status else detail)
        self.status, self.detail, self.code = status, detail, code
        self.retry_after = retry_after


class NotConfigured(ServiceError):
    """No server URL or API key: neither MIPP_URL/MIPP_API_KEY nor a `mipp login` file."""

    def __init__(self, detail: str):
        super().__init__(0, detail, "not_configured")


# --------------------------------------------------------------------------------------------
# Where `mipp login` keeps the URL and key


def config_path() -> Path:
    """The user's client config file: $MIPP_CONFIG, else $XDG_CONFIG_HOME/mipp/client.json
    (~/.config/mipp/client.json)."""
    explicit = os.environ.get("MIPP_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "mipp" / "client.json"


def save_login(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write the URL and key to the config file, readable by its owner only (0600)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "api_key": api_key}, fh)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # an existing file keeps its old mode otherwise
    return path


def load_login(path: Path | None = None) -> dict[str, str]:
    """The saved {"url", "api_key"}; {} when there is no file."""
    path = path or config_path()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise NotConfigured(f"cannot read {path} ({exc}); run `mipp login` again") from None


def _error_from(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if not isinstance(detail, str):  # FastAPI's validation list
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                if isinstance(e, dict) else str(e) for e in detail
            )
        retry = response.headers.get("Retry-After", "")
        return ServiceError(response.status_code, detail, body.get("code"),
                            float(retry) if retry.isdigit() else None)
    text = response.text.strip()[:300] or response.reason_phrase
    return ServiceError(response.status_code, text)


def _form_value(value: Any) -> str:
    """Multipart form fields are strings; dicts and lists travel as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


class Client:
    """One server and one API key.

    url: the server root (e.g. http://127.0.0.1:8000); api_key: a key from `mipp admin
    create-user`. http: an existing httpx.Client to send through (e.g. FastAPI's TestClient);
    its base URL is then used and `url` only names the server in messages.
    """

    def __init__(self, url: str, api_key: str, *, http: httpx.Client | None = None,
                 timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._own_http = http is None
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)

    @classmethod
    def from_config(cls, url: str | None = None, api_key: str | None = None, **kwargs) -> Client:
        """Arguments first, then MIPP_URL / MIPP_API_KEY, then the `mipp login` file."""
        saved = load_login() if not (url or os.environ.get("MIPP_URL")) or not (
            api_key or os.environ.get("MIPP_API_KEY")) else {}
        url = url or os.environ.get("MIPP_URL") or saved.get("url")
        api_key = api_key or os.environ.get("MIPP_API_KEY") or saved.get("api_key")
        if not url or not api_key:
            raise NotConfigured(
                "no server configured: run `mipp login URL` (it asks for the API key) or set "
                "MIPP_URL and MIPP_API_KEY"
            )
        return cls(url, api_key, **kwargs)

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201, 204),
                **kwargs) -> httpx.Response:
        """Send one request under /api/v1; raise ServiceError unless the status is expected."""
        headers = {**self._auth, **kwargs.pop("headers", {})}
        try:
            response = self.http.request(method, API_PREFIX + path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(0, f"cannot reach the service at {self.url}: {exc}") from None
        if response.status_code not in expect:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs) -> Any:
        response = self.request(method, path, **kwargs)
        return None if response.status_code == 204 else response.json()

    # -- users, models, datasets -------------------------------------------------------------

    def me(self) -> dict:
        return self._json("GET", "/users/me")

    def upload_model(self, path: str | os.PathLike, **fields: Any) -> dict:
        """POST /models: `path` is the weights file; every other form field passes through
        (arch, format, config, input_shape, num_classes, name, ...). Dicts/lists go as JSON."""
        return self._upload("/models", path, fields)

    def upload_dataset(self, path: str | os.PathLike, **fields: Any) -> dict:
        """POST /datasets: an .npz with x, y[, x_test, y_test]; other form fields pass through."""
        return self._upload("/datasets", path, fields)

    def _upload(self, route: str, path: str | os.PathLike, fields: Mapping[str, Any]) -> dict:
        path = Path(path)
        data = {k: _form_value(v) for k, v in fields.items() if v is not None}
        with open(path, "rb") as fh:
            return self._json("POST", route, data=data, files={"file": (path.name, fh)})

    def add_builtin_dataset(self, name: str, display_name: str | None = None) -> dict:
        body = {"name": name, **({"display_name": display_name} if display_name else {})}
        return self._json("POST", "/datasets/builtin", json=body)

    def list_models(self, **params: Any) -> dict:
        return self._json("GET", "/models", params=params)

    def list_datasets(self, **params: Any) -> dict:
        return self._json("GET", "/datasets", params=params)

    # -- jobs --------------------------------------------------------------------------------

    def submit_job(self, model_id: str, dataset_id: str, config: Mapping[str, Any] | None = None,
                   **extra: Any) -> dict:
        """POST /jobs; extra: queue, time_limit_s, idempotency_key."""
        body = {"model_id": model_id, "dataset_id": dataset_id, "config": dict(config or {}),
                **{k: v for k, v in extra.items() if v is not None}}
        return self._json("POST", "/jobs", json=body)

    def list_jobs(self, *, status: str | list[str] | None = None, limit: int = 50,
                  offset: int = 0, **filters: Any) -> dict:
        """GET /jobs: a page {items, total, limit, offset}; filters pass through as query
        parameters (model_id, dataset_id, sweep_id, ...)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset,
                                  **{k: v for k, v in filters.items() if v is not None}}
        if status:
            params["status"] = [status] if isinstance(status, str) else list(status)
        return self._json("GET", "/jobs", params=params)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def layers(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/jobs/{job_id}/layers")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        """DELETE /jobs/{id}: an ended job, its rows and its artifacts (409 while it is queued
        or running: cancel it first)."""
        try:
            self.request("DELETE", f"/jobs/{job_id}")
        except ServiceError as exc:
            if exc.status == 405:
                raise ServiceError(405, "this server cannot delete jobs (DELETE /jobs/{id} is "
                                        "not available; upgrade the server)", "not_supported") from None
            raise

    def wait(self, job_id: str, *, progress: Callable[[dict], None] | None = None,
             poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
        """Poll until the job ends; `progress(job)` sees every polled state. Returns the job.
        Raises TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job["status"] in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def log(self, job_id: str) -> str:
        """The job's log so far (all of it once the job has ended)."""
        return self.request("GET", f"/jobs/{job_id}/log").text

    def follow_log(self, job_id: str) -> Iterator[str]:
        """Yield the job's log lines as the worker writes them, until the job ends."""
        headers = {**self._auth}
        try:
            with self.http.stream("GET", f"{API_PREFIX}/jobs/{job_id}/log",
                                  params={"follow": "true"}, headers=headers,
                                  timeout=httpx.Timeout(60.0, read=None)) as response:
                if response.status_code != 200:
                    response.read()
                    raise _error_from(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise ServiceError(0, f"lost the log stream from {self.url}: {exc}") from None

    def artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/jobs/{job_id}/artifacts")

    def download(self, job_id: str, name: str, dest: str | os.PathLike) -> Path:
        """Download one artifact to `dest` (a file path, or a directory to put `name` in)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        try:
            with self.http.stream("GET", f"{API_PREFIX}/jobs/{job_id}/artifacts/{name}",
                                  headers=self._auth, follow_redirects=False) as response:
                if response.status_code == 200:
                    _write_stream(response.iter_bytes(), dest)
                    return dest
                response.read()
                if response.status_code != 307:
                    raise _error_from(response)
                location = response.headers["location"]
            # An S3 store answers with a presigned URL on the store itself: fetch it without
            # our key (the signature is the credential).
            with httpx.stream("GET", location, timeout=60) as fetched:
                if fetched.status_code != 200:
                    fetched.read()
                    raise ServiceError(fetched.status_code,
                                       f"the object store refused {name}: {fetched.text[:200]}")
                _write_stream(fetched.iter_bytes(), dest)
        except httpx.TransportError as exc:
            raise ServiceError(0, f"download of {name} from {self.url} failed: {exc}") from None
        return dest

    def download_model(self, job_id: str, dest: str | os.PathLike) -> Path:
        """Download model.tar.gz and unpack it into `dest`; returns the model directory
        (load it with `mipp.load_model_dir`)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        archive = self.download(job_id, "model.tar.gz", dest / "model.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")  # no absolute paths, links out, devices
        archive.unlink()
        return dest / "model"

    # -- sweeps ------------------------------------------------------------------------------

    def submit_sweep(self, model_id: str, dataset_id: str, *, targets: list[float] | None = None,
                     tols: list[float] | None = None, methods: list[str] | None = None,
                     seeds: list[int] | None = None, config: Mapping[str, Any] | None = None,
                     **extra: Any) -> dict:
        """POST /sweeps: one child job per (method, target or tol, seed)."""
        body = {"model_id": model_id, "dataset_id": dataset_id, "config": dict(config or {}),
                "targets": targets, "tols": tols, "methods": methods, "seeds": seeds,
                **extra}
        return self._json("POST", "/sweeps", json={k: v for k, v in body.items() if v is not None})

    def sweep(self, sweep_id: str) -> dict:
        return self._json("GET", f"/sweeps/{sweep_id}")

    def list_sweeps(self, **params: Any) -> dict:
        return self._json("GET", "/sweeps", params=params)

    def cancel_sweep(self, sweep_id: str) -> dict:
        """Cancel every job of the sweep that has not ended."""
        return self._json("POST", f"/sweeps/{sweep_id}/cancel")

    def sweep_plot(self, sweep_id: str, dest: str | os.PathLike) -> Path:
        """The sweep's accuracy-vs-size plot as SVG, written to `dest`."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"sweep-{sweep_id}.svg"
        _write_stream([self.request("GET", f"/sweeps/{sweep_id}/plot.svg").content], dest)
        return dest

    def wait_sweep(self, sweep_id: str, *, progress: Callable[[dict], None] | None = None,
                   poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
        """Poll until every child job has ended; returns the sweep."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            sweep = self.sweep(sweep_id)
            if progress is not None:
                progress(sweep)
            if sweep["status"] in FINAL_STATUSES:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {sweep['status']} after {timeout_s} s")
            time.sleep(poll_s)


def _write_stream(chunks, dest: Path) -> None:
    """Write to a temporary name, then rename: a broken download leaves no half file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with open(partial, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
    partial.replace(dest)
