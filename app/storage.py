"""Object store behind one small interface: a local directory (default) or S3 through boto3.

Keys are '/'-separated, e.g. `users/{uid}/jobs/{jid}/model.tar.gz`; nothing outside a key
prefix is ever touched. boto3 is synchronous: routes that call it are plain `def` routes,
which FastAPI runs in its threadpool.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from app.settings import Settings


class StoreError(Exception):
    """The store could not be reached or refused an operation (not the user's fault)."""


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def modified_at(self, key: str) -> float | None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    def presign_get(self, key: str, filename: str, ttl_s: int) -> str | None: ...
    def open_stream(self, key: str): ...
    def check(self) -> None: ...


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return key


class LocalStore:
    """Files under one root directory; a key is a relative path."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # readers never see half a file

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"object {key!r} is missing from the store")
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def modified_at(self, key: str) -> float | None:
        """When the object was last written (Unix time); None when it is missing."""
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete_prefix(self, prefix: str) -> None:
        target = self.root / _safe_key(prefix.rstrip("/"))
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def presign_get(self, key: str, filename: str, ttl_s: int) -> str | None:
        return None  # served by the API itself, behind the auth check

    def open_stream(self, key: str):
        return open(self._path(key), "rb")

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store directory {self.root} is not writable")


class S3Store:
    """An S3-compatible bucket (AWS, SeaweedFS, Ceph RGW, moto...)."""

    def __init__(self, settings: Settings):
        import boto3
        from botocore.config import Config

        common = dict(
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.bucket = settings.s3_bucket
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **common)
        # Presign with the host users reach: the host is part of the signature.
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.public_client = (
            boto3.client("s3", endpoint_url=public, **common)
            if public != settings.s3_endpoint_url
            else self.client
        )
        self.presign = settings.s3_presign_downloads
        self.region = settings.s3_region
        # The bucket is made at start-up if the store answers, else on every later use until
        # it does (each /readyz probe retries): a store that starts slower than the API no
        # longer leaves it without a bucket until a restart.
        self.bucket_ready = not settings.s3_create_bucket
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        if self.bucket_ready:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        region = self.region
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self.bucket_ready = True
        except ClientError:
            try:
                kwargs = {}
                if region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                self.client.create_bucket(Bucket=self.bucket, **kwargs)
                self.bucket_ready = True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StoreError(f"cannot create bucket {self.bucket!r}: {exc}") from exc
                self.bucket_ready = True
        except BotoCoreError as exc:
            # Not fatal: /readyz reports it, requests fail with 503, and the next use retries.
            logging.getLogger("mipp.store").warning("S3 store not reachable yet: %s", exc)

    def _wrap(self, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        self._ensure_bucket()
        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"S3 {fn.__name__} failed: {exc}") from exc

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        self._wrap(
            self.client.upload_file,
            str(path),
            self.bucket,
            _safe_key(key),
            ExtraArgs={"ContentType": content_type},
        )

    def get_file(self, key: str, path: Path) -> None:
        self._wrap(self.client.download_file, self.bucket, _safe_key(key), str(path))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=_safe_key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(str(exc)) from exc
        except BotoCoreError as exc:  # unreachable: the caller answers 503
            raise StoreError(f"S3 head_object failed: {exc}") from exc

    def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._wrap(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)))
        for page in pages:
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._wrap(self.client.delete_object, Bucket=self.bucket, Key=_safe_key(key))

    def modified_at(self, key: str) -> float | None:
        from botocore.exceptions import ClientError

        try:
            head = self._wrap(self.client.head_object, Bucket=self.bucket, Key=_safe_key(key))
        except StoreError as exc:
            if isinstance(exc.__cause__, ClientError) and exc.__cause__.response.get(
                    "Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head["LastModified"].timestamp()

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list_keys(_safe_key(prefix.rstrip("/")) + "/")
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self._wrap(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": chunk})

    def local_path(self, key: str) -> Path | None:
        return None

    def presign_get(self, key: str, filename: str, ttl_s: int) -> str | None:
        if not self.presign:
            return None
        return self._wrap(
            self.public_client.generate_presigned_url,
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": _safe_key(key),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=ttl_s,
        )

    def open_stream(self, key: str):
        return self._wrap(self.client.get_object, Bucket=self.bucket, Key=_safe_key(key))["Body"]

    def check(self) -> None:
        self._wrap(self.client.head_bucket, Bucket=self.bucket)


def make_store(settings: Settings) -> ObjectStore:
    if settings.store == "s3":
        return S3Store(settings)
    return LocalStore(settings.store_dir)


def user_prefix(user_id: str) -> str:
    return f"users/{user_id}"


def model_key(user_id: str, model_id: str, filename: str) -> str:
    return f"{user_prefix(user_id)}/models/{model_id}/{filename}"


def dataset_key(user_id: str, dataset_id: str) -> str:
    return f"{user_prefix(user_id)}/datasets/{dataset_id}/data.npz"


def job_prefix(user_id: str, job_id: str) -> str:
    return f"{user_prefix(user_id)}/jobs/{job_id}"


def attempt_prefix(user_id: str, job_id: str, attempt: int) -> str:
    """Where attempt `attempt` of a job writes: a stale attempt never touches another's files."""
    return f"{job_prefix(user_id, job_id)}/attempt-{attempt}"
