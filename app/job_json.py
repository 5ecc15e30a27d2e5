"""Job answers as JSON bytes, rendered once per row: the serialisation of the hot reads
(`GET /jobs/{id}`, `GET /jobs`).

A job's answer (`JobOut`) is a pure function of the columns it shows, so the rendered bytes
are cached with that row as the key: a row that differs in any column is another key, so a
cached answer is never stale and nothing needs invalidating. The JSON columns are read as the
database's own text and decoded only on a miss, and timestamps (which app.db.ReadQuery takes
as the driver gives them, in the connection's time zone) are turned to UTC there too: two rows
of the same instant in different zones are equal keys and get the same (UTC) answer. At 50
clients listing 20 jobs, decoding the JSON columns and validating and encoding the 20 answers
had been a third of the API's CPU (bench/bench_api_load.py; BENCHMARKS.md §7).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache

from pydantic import TypeAdapter
from sqlalchemy import Text, cast

from app.models import Job
from app.schemas import JobOut

FIELDS = tuple(JobOut.model_fields)
JSON_FIELDS = frozenset({"config", "metrics", "layer_units"})
# The columns an answer shows, JSON ones as text, in JobOut's order; never the masks (they
# can be large, and no answer shows them).
COLUMNS = tuple(cast(Job.__table__.c[name], Text).label(name) if name in JSON_FIELDS
                else Job.__table__.c[name] for name in FIELDS)
ID, OWNER_ID = FIELDS.index("id"), FIELDS.index("owner_id")
_JOB = TypeAdapter(JobOut)

# About 2 kB of key and 2 kB of answer per job: a few MB per API process.
CACHED_JOBS = 2048


@lru_cache(maxsize=CACHED_JOBS)
def job_json(row: tuple) -> bytes:
    """The answer for a row of COLUMNS, as FastAPI would send `JobOut` (the same bytes)."""
    values = dict(zip(FIELDS, row))
    for name in JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return _JOB.dump_json(JobOut.model_validate(values))


def page_json(rows: list[tuple], total: int, limit: int, offset: int) -> bytes:
    """A `Page[JobOut]` of rows of COLUMNS, as FastAPI would send it."""
    items = b",".join(job_json(tuple(row)) for row in rows)
    return b'{"items":[%b],"total":%d,"limit":%d,"offset":%d}' % (items, total, limit, offset)
