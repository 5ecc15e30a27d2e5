"""Small helpers the resource routers share."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Query
from sqlalchemy import Connection, Select, bindparam, func, select, true
from sqlalchemy.orm import Session

from app.core.scratch import scratch_dir
from app.db import ReadQuery
from app.errors import InvalidRequest
from app.settings import Settings


# Paging parameters every list route shares. The offset bound keeps it inside a 64-bit SQL
# integer on every backend (2**63 was a 500 on PostgreSQL and SQLite).
MAX_OFFSET = 1_000_000_000
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page (1-200).")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
MAX_NAME_CHARS = 200  # the name columns are VARCHAR(200)
MAX_JSON_FIELD_DEPTH = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_text(value: str | None, field: str, max_chars: int = MAX_NAME_CHARS) -> str | None:
    """A name-like field: no control characters (PostgreSQL refuses NUL), at most `max_chars`."""
    if value is None:
        return None
    if _CONTROL.search(value):
        raise InvalidRequest(
            f"{field} contains a control character (e.g. NUL or a newline); remove it"
        )
    if len(value) > max_chars:
        raise InvalidRequest(
            f"{field} is {len(value)} characters long; at most {max_chars} are allowed"
            + ("; rename the file or pass `name`" if field == "filename" else "")
        )
    return value


def page(session: Session, stmt: Select, order_by, limit: int, offset: int) -> tuple[list, int]:
    """One page of `stmt` (a select of one ORM entity) and the total it matches."""
    count = select(func.count()).select_from(stmt.order_by(None).subquery())
    total = session.execute(count).scalar()
    items = session.execute(stmt.order_by(order_by).limit(limit).offset(offset)).scalars()
    return list(items.all()), int(total or 0)


class PagedQuery:
    """Pages of `stmt` (a select of columns of one table, `key` its primary key, written with
    plain named bind parameters: it runs as an app.db.ReadQuery) as tuples of its columns,
    with the total it matches, newest first by `order` (columns of `stmt`'s table, the last one
    unique, so that pages neither repeat nor skip rows). Built once and reused: building a
    statement and its cache key cost more than running it.

    With `caller` (a select that returns at most one row, e.g. the key check), that row comes
    in front of each page row in the same query, and once alone when the page is empty, so
    the caller and the page are one round trip."""

    def __init__(self, stmt: Select, key, order: tuple, caller: Select | None = None):
        newest_first = [column.desc() for column in order]
        # The page's keys and the total (a window count) are chosen first, so the database
        # reads the shown columns (large JSON text) of the page's rows only.
        chosen = (stmt.with_only_columns(key, func.count().over().label("total"))
                  .order_by(*newest_first).limit(bindparam("limit"))
                  .offset(bindparam("offset")).subquery())
        page = (select(*stmt.selected_columns, chosen.c.total)
                .join_from(key.table, chosen, key == chosen.c[key.name]))
        self.caller_width = 0
        if caller is None:
            page = page.order_by(*newest_first)
        else:
            caller_rows, page_rows = caller.subquery(), page.subquery()
            self.caller_width = len(caller.selected_columns)
            page = (select(caller_rows, page_rows)
                    .select_from(caller_rows.outerjoin(page_rows, true()))
                    .order_by(*(page_rows.c[column.key].desc() for column in order)))
        self.page = ReadQuery(page)
        self.count = ReadQuery(select(func.count()).select_from(stmt.subquery()))
        self.key_index = [column.key for column in stmt.selected_columns].index(key.key)

    def run(self, connection: Connection, params: dict, limit: int, offset: int
            ) -> tuple[tuple | None, list[tuple], int]:
        """(the caller's row or None, the page's rows, the total) in one query; a second one
        counts only when the page is empty (an offset past the end)."""
        found = self.page.rows(connection, {**params, "limit": limit, "offset": offset})
        width = self.caller_width
        caller = tuple(found[0][:width]) if width and found else None
        rows = [row[width:-1] for row in found if row[width + self.key_index] is not None]
        if width and not found:
            return None, [], 0
        if rows:
            return caller, rows, int(found[0][-1])
        return caller, [], int(self.count.rows(connection, params)[0][0] or 0)


@contextmanager
def upload_tmpdir(settings: Settings):
    """Where an upload is spooled and checked; an API killed mid-upload leaves it to
    app.core.scratch.remove_abandoned."""
    with scratch_dir(settings.tmp_dir, "upload") as tmp:
        yield tmp


def parse_json_field(text: str | None, field: str, kind: type, example: str) -> Any:
    if text is None or text == "":
        return None
    from app.body_guard import MalformedJson, check_json

    try:
        value = check_json(text.encode("utf-8", "surrogatepass"), MAX_JSON_FIELD_DEPTH)
    except MalformedJson as exc:
        message = str(exc).replace("the body", f"form field {field!r}")
        raise InvalidRequest(f"{message}; e.g. {example}") from None
    if not isinstance(value, kind):
        raise InvalidRequest(f"form field {field!r} must be a JSON {kind.__name__}, e.g. {example}")
    return value


# What each error status means, for the OpenAPI `responses=` of every route (the body is
# always app.schemas.ErrorOut).
ERROR_MEANINGS = {
    401: "Missing, unknown or revoked API key.",
    403: "Not allowed on this server (e.g. code uploads are off).",
    404: "Not found, or not yours (another user's id answers the same).",
    409: "Conflicts with the resource's state (in use, still running, key reused).",
    413: "Too large: the upload limit, or your storage quota (the message names both the "
         "limit and your usage).",
    422: "Malformed body or invalid field: `errors` lists each bad field.",
    429: "Too many: the key's request rate (with Retry-After) or your active-jobs limit.",
    503: "The database, the broker or the object store is unavailable; try again.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each with the one error schema."""
    from app.schemas import ErrorOut

    return {status: {"model": ErrorOut, "description": ERROR_MEANINGS[status]}
            for status in statuses}


# Every authenticated route can answer these.
AUTHENTICATED = error_responses(401, 429, 503)
