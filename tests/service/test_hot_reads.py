"""The hot reads (`GET /jobs/{id}`, `GET /jobs`): their answers are the bytes FastAPI would
have sent for `JobOut` / `Page[JobOut]`, a cached answer is never stale, pages neither repeat
nor skip jobs, and a read survives the database dropping its connections. Both setups."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter
from sqlalchemy import bindparam, event, select, text, update

from app import job_json
from app.db import ReadQuery, session_scope
from app.models import Job, JobStatus, User, utcnow
from app.schemas import JobOut, Page

pytestmark = pytest.mark.integration

METRICS = {"accuracy": {"dense": 0.975, "retrained": 0.96}, "units": {"before": 112,
                                                                     "after": 48}}


def _add_jobs(service, user: str, n: int, **values) -> list[str]:
    """n finished jobs of `user`, written straight to the database (no worker needed)."""
    with session_scope(service.app.state.sessionmaker) as session:
        owner = session.scalar(select(User).where(User.name.like(f"{user}-{service.name}-%"))
                               .order_by(User.created_at.desc()))
        fields = {"config": {"method": "l1", "target": 0.5, "nested": [1.5]},
                  "queue": "gpu-default", "time_limit_s": 60, "status": JobStatus.SUCCEEDED,
                  "phase": JobStatus.SUCCEEDED, "progress": 1.0, "message": "done",
                  "attempt": 1, "metrics": METRICS, "tol": 0.01,
                  "layer_units": {"fc1": {"before": 64, "after": 20}}, **values}
        jobs = [Job(owner_id=owner.id, **fields) for _ in range(n)]
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def _as_fastapi_would(service, job_ids: list[str]) -> list[JobOut]:
    with service.app.state.sessionmaker() as session:
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        return [JobOut.model_validate(rows[i]) for i in job_ids]


def test_answers_are_the_bytes_fastapi_would_send(service):
    headers = service.add_user("reader")
    ids = _add_jobs(service, "reader", 3)
    ids += _add_jobs(service, "reader", 1, metrics=None, layer_units=None, tol=None,
                     error="a reason", finished_at=utcnow())
    for job_id, expected in zip(ids, _as_fastapi_would(service, ids)):
        answer = service.client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.content == TypeAdapter(JobOut).dump_json(expected)

    answer = service.client.get("/api/v1/jobs?limit=3&offset=1", headers=headers)
    newest_first = _as_fastapi_would(service, ids[::-1])
    page = Page[JobOut](items=newest_first[1:4], total=4, limit=3, offset=1)
    assert answer.content == TypeAdapter(Page[JobOut]).dump_json(page)


def test_a_cached_answer_follows_every_change_of_its_row(service):
    headers = service.add_user("watcher")
    [job_id] = _add_jobs(service, "watcher", 1, status=JobStatus.RUNNING, progress=0.25)
    url = f"/api/v1/jobs/{job_id}"
    assert service.client.get(url, headers=headers).json()["progress"] == 0.25
    for progress, config in ((0.5, {"method": "l1", "target": 0.5, "nested": [1.5]}),
                             (0.5, {"method": "l1", "target": 0.5, "nested": [2.5]})):
        with session_scope(service.app.state.sessionmaker) as session:
            session.execute(update(Job).where(Job.id == job_id)
                            .values(progress=progress, config=config))
        for answer in (service.client.get(url, headers=headers).json(),
                       service.client.get("/api/v1/jobs", headers=headers).json()["items"][0]):
            assert (answer["progress"], answer["config"]) == (progress, config)


def test_pages_neither_repeat_nor_skip_jobs_submitted_at_the_same_instant(service):
    headers = service.add_user("pager")
    same = utcnow()
    ids = set(_add_jobs(service, "pager", 7, created_at=same))
    seen = []
    for offset in range(0, 8, 2):
        page = service.client.get(f"/api/v1/jobs?limit=2&offset={offset}",
                                  headers=headers).json()
        assert page["total"] == 7
        seen += [item["id"] for item in page["items"]]
    assert len(seen) == 7 and set(seen) == ids
    past_the_end = service.client.get("/api/v1/jobs?limit=2&offset=50", headers=headers).json()
    assert (past_the_end["items"], past_the_end["total"]) == ([], 7)


def test_a_read_survives_the_database_dropping_its_connections(team_service):
    """PostgreSQL restarted or an idle timeout: the reads' pooled connection is dead; the
    read is retried on a new one instead of answering 503."""
    service = team_service
    headers = service.add_user("survivor")
    [job_id] = _add_jobs(service, "survivor", 1)
    url = f"/api/v1/jobs/{job_id}"
    assert service.client.get(url, headers=headers).status_code == 200  # pools a connection
    assert service.client.get("/api/v1/jobs", headers=headers).status_code == 200
    with service.app.state.engine.connect() as connection:
        killed = connection.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'mipp-api-reads'")
        ).scalar()
    assert killed >= 1
    for _ in range(2):
        assert service.client.get(url, headers=headers).status_code == 200
        assert service.client.get("/api/v1/jobs", headers=headers).status_code == 200


def test_the_list_follows_its_callers_rank_and_key_at_once(service):
    """The list guesses from the key whether the caller is an admin (one query for the key
    check and the page); the guess never shows: promoted, demoted or revoked, the very next
    list is right."""
    owner = service.add_user("lister")
    boss = service.add_user("boss")
    mine = set(_add_jobs(service, "lister", 2))
    theirs = set(_add_jobs(service, "boss", 1))

    def listed(headers) -> set[str]:
        answer = service.client.get("/api/v1/jobs?limit=200", headers=headers)
        assert answer.status_code == 200, answer.text
        return {item["id"] for item in answer.json()["items"]}

    def set_admin(user: str, value: bool) -> None:
        with session_scope(service.app.state.sessionmaker) as session:
            session.execute(update(User).where(User.name.like(f"{user}-{service.name}-%"))
                            .values(is_admin=value))

    assert listed(owner) >= mine and not listed(owner) & theirs
    assert listed(boss) == theirs
    set_admin("boss", True)
    assert listed(boss) >= mine | theirs  # an admin's list: everyone's
    assert listed(boss) >= mine | theirs
    set_admin("boss", False)
    assert listed(boss) == theirs
    with session_scope(service.app.state.sessionmaker) as session:
        session.execute(text(
            "UPDATE api_keys SET revoked = :yes WHERE user_id IN "
            "(SELECT id FROM users WHERE name LIKE :name)"),
            {"yes": True, "name": f"lister-{service.name}-%"})
    answer = service.client.get("/api/v1/jobs", headers=owner)
    assert answer.status_code == 401 and "revoked" in answer.json()["detail"]


def test_timestamps_are_utc_whatever_the_connections_time_zone(team_service):
    """The reads take timestamps as the driver gives them, in the connection's time zone; the
    answers must still show them in UTC, as FastAPI would."""
    service = team_service
    headers = service.add_user("zoned")
    ids = _add_jobs(service, "zoned", 2, started_at=utcnow(), finished_at=utcnow())
    reads = service.app.state.reads.engine

    @event.listens_for(reads, "connect")
    def _kolkata(dbapi_connection, _record):
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'Asia/Kolkata'")

    try:
        reads.dispose()  # new connections, in +05:30
        job_json.job_json.cache_clear()  # no answer rendered from a UTC row
        with reads.connect() as connection:
            assert connection.exec_driver_sql("SHOW TIME ZONE").scalar() == "Asia/Kolkata"
        expected = _as_fastapi_would(service, ids)
        answer = service.client.get(f"/api/v1/jobs/{ids[0]}", headers=headers)
        assert answer.content == TypeAdapter(JobOut).dump_json(expected[0])
        assert answer.json()["started_at"].endswith("Z")
        page = service.client.get("/api/v1/jobs", headers=headers)
        assert page.content == TypeAdapter(Page[JobOut]).dump_json(
            Page[JobOut](items=expected[::-1], total=2, limit=50, offset=0))
    finally:
        event.remove(reads, "connect", _kolkata)
        reads.dispose()


def test_the_status_filter_takes_one_or_several_statuses(service):
    headers = service.add_user("filterer")
    running = _add_jobs(service, "filterer", 2, status=JobStatus.RUNNING)
    failed = _add_jobs(service, "filterer", 1, status=JobStatus.FAILED, error="a reason")
    _add_jobs(service, "filterer", 3)  # succeeded

    def listed(query: str) -> set[str]:
        page = service.client.get(f"/api/v1/jobs?{query}", headers=headers)
        assert page.status_code == 200, page.text
        assert page.json()["total"] == len(page.json()["items"])
        return {item["id"] for item in page.json()["items"]}

    assert listed("status=running") == set(running)
    assert listed("status=running&status=failed") == set(running + failed)
    assert listed("status=failed&status=running&status=failed") == set(running + failed)
    assert len(listed("status=succeeded&status=running")) == 5
    assert listed("status=cancelled&status=queued") == set()


def test_a_read_query_refuses_parameters_only_sqlalchemy_could_send(team_service):
    """A ReadQuery goes to the driver as compiled once; an expanding IN list (which SQLAlchemy
    rewrites per call) or a literal (whose value only SQLAlchemy would fill in) must be
    refused, not sent wrong."""
    expanding = ReadQuery(select(Job.id).where(Job.status.in_(
        bindparam("statuses", expanding=True))))
    literal = ReadQuery(select(Job.id).where(Job.status == bindparam("status")).limit(1))
    plain = ReadQuery(select(Job.id).where(Job.status == bindparam("status")))
    with team_service.app.state.reads.engine.connect() as connection:
        with pytest.raises(ValueError, match="statuses"):
            expanding.rows(connection, {"statuses": [JobStatus.RUNNING]})
        with pytest.raises(ValueError, match="param_1"):
            literal.rows(connection, {"status": JobStatus.RUNNING})
        assert plain.rows(connection, {"status": "none such"}) == []
