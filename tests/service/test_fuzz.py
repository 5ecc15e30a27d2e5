"""OpenAPI-driven fuzzing (schemathesis + hypothesis): every operation of the served schema,
schema-conforming and schema-violating requests, authenticated with a real key, on
PostgreSQL (team) and SQLite (embedded). Goal: no answer >= 500 in at least 1,000 cases per
backend, and every error in the one shape {detail, code, errors?}.

Bounded: a fixed number of examples per operation and mode, derandomized (the same cases on
every run), generation only (no shrinking). Half the cases that name a model, dataset or job
get the id of a real one, so the fuzzer reaches past the 404s.
"""

from __future__ import annotations

import warnings

import pytest

pytestmark = pytest.mark.integration

EXAMPLES_PER_MODE = 24  # x 2 modes x ~23 operations: ~1,100 cases per backend
MIN_CASES = 1_000


def _seed(service, digits_files, user: str) -> dict[str, str]:
    """A real model, dataset and job (on a queue no worker reads) for the fuzzer to aim at."""
    model = service.upload_model(user, digits_files["weights"])
    dataset = service.upload_dataset(user, digits_files["npz"])
    job = service.submit(user, model["id"], dataset["id"], {"method": "random", "target": 0.5})
    return {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job["id"],
            "name": "log.txt"}


def test_openapi_fuzz_has_no_server_errors(service, digits_files):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    service.add_user("fuzzer")
    key = service.users["fuzzer"]
    original_queue = service.settings.default_queue
    service.settings.default_queue = f"{original_queue}-fuzz-idle"  # no worker runs these
    try:
        real = _seed(service, digits_files, "fuzzer")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schema = schemathesis.openapi.from_asgi("/openapi.json", service.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        statuses: dict[int, int] = {}
        server_errors: list[tuple] = []
        shape_errors: list[tuple] = []

        def runner(operation, mode):
            @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None,
                      derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode), aim=st.booleans())
            def run(case, aim):
                if aim:
                    for name in list(case.path_parameters or {}):
                        if name in real:
                            case.path_parameters[name] = real[name]
                    if isinstance(case.body, dict) and "model_id" in case.body:
                        case.body["model_id"] = real["model_id"]
                        case.body["dataset_id"] = real["dataset_id"]
                if isinstance(case.query, dict) and case.query.get("follow") not in (None, False):
                    # A followed log streams until its job ends; the aimed-at job never runs.
                    case.query["follow"] = False
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    response = case.call(headers={"Authorization": f"Bearer {key}"})
                status = response.status_code
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500:
                    server_errors.append((operation.label, mode.value, status,
                                          response.text[:300], repr(case)[:500]))
                elif status >= 400:
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                    if not (isinstance(body, dict) and {"detail", "code"} <= set(body)
                            and set(body) <= {"detail", "code", "errors"}):
                        shape_errors.append((operation.label, status, response.text[:200]))

            return run

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    runner(operation, mode)()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE  # nothing to break (no parameters)
    finally:
        service.settings.default_queue = original_queue
        _cancel_queued(service, "fuzzer")

    total = sum(statuses.values())
    print(f"fuzz {service.name}: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert total >= MIN_CASES, statuses
    assert not server_errors, server_errors[:10]
    assert not shape_errors, shape_errors[:10]
    assert statuses.get(201, 0) > 0 and statuses.get(422, 0) > 0  # it got past validation too


def _cancel_queued(service, user: str) -> None:
    headers = service.headers(user)
    page = service.client.get("/api/v1/jobs?status=queued&limit=200", headers=headers).json()
    for job in page.get("items", []):
        service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=headers)
