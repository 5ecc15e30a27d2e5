"""Small helpers the resource routers share."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
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
