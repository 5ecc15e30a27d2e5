"""Small helpers the resource routers share."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidRequest
from app.models import Job, JobStatus
from app.settings import Settings


def page(session: Session, stmt: Select, order_by, limit: int, offset: int) -> tuple[list, int]:
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = session.scalars(stmt.order_by(order_by).limit(limit).offset(offset)).all()
    return list(rows), int(total or 0)


@contextmanager
def upload_tmpdir(settings: Settings):
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir, prefix="upload-") as tmp:
        yield Path(tmp)


def parse_json_field(text: str | None, field: str, kind: type, example: str) -> Any:
    if text is None or text == "":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"form field {field!r} is not valid JSON ({exc}); e.g. {example}") from None
    if not isinstance(value, kind):
        raise InvalidRequest(f"form field {field!r} must be a JSON {kind.__name__}, e.g. {example}")
    return value


def delete_unless_in_use(session: Session, store, row, job_column, what: str) -> None:
    """Delete an uploaded model/dataset row and its stored file, unless an active job uses it.

    The row goes first (committed), then the file: a failed store delete leaves an orphan
    file, never a row that points at nothing.
    """
    active = session.scalar(
        select(Job.id).where(job_column == row.id, Job.status.in_(JobStatus.ACTIVE)).limit(1)
    )
    if active:
        raise Conflict(f"{what} {row.id!r} is used by active job {active!r}; cancel it first")
    key = row.store_key
    session.delete(row)
    session.commit()
    if key:
        store.delete(key)
