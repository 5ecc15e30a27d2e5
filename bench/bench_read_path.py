"""The job list's read path in-process, without HTTP: one page of 20 jobs read and rendered,
through SQLAlchemy's `execute` against through `app.db.ReadQuery` (the driver's cursor), on
one PostgreSQL connection of the API's reads, alternated in blocks, in the same run.

    .venv/bin/python bench/bench_read_path.py [--reps 2000] [--blocks 5]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust). A scratch database gets 200
succeeded jobs of one user (as bench/bench_api_load.py seeds them) and is dropped at the end.
Each block times `--reps` page reads of each path after 200 untimed ones; rendering
(app.job_json.page_json) is included in both, with its answers cached as in the API. Both
paths must give the same bytes. One row per run is appended to bench/results/read_path.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "read_path.jsonl"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()

    import bench_api_load as load
    from app import job_json
    from app.db import Reads, make_engine
    from app.routes.jobs import _jobs_query
    from app.security import hash_key

    db = "mipp_bench_read_path"
    load._psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    load._psql(f'CREATE DATABASE "{db}"')
    url = f"postgresql+psycopg://{load.PG}/{db}"
    try:
        key, _ = load.seed_jobs(url)
        engine = make_engine(url)
        reads = Reads(url, engine, 1)
        query = _jobs_query(True, 0, ())
        params = {"key_hash": hash_key(key), "limit": 20, "offset": 0}
        width = query.caller_width

        def through_sqlalchemy(connection) -> bytes:
            found = [tuple(row) for row in connection.execute(query.page.stmt, params)]
            return job_json.page_json([row[width:-1] for row in found], found[0][-1], 20, 0)

        def through_the_cursor(connection) -> bytes:
            found = query.page.rows(connection, params)
            return job_json.page_json([row[width:-1] for row in found], found[0][-1], 20, 0)

        paths = {"sqlalchemy": through_sqlalchemy, "cursor": through_the_cursor}
        ms: dict[str, list[float]] = {name: [] for name in paths}
        with reads.engine.connect() as connection:
            answers = {name: fn(connection) for name, fn in paths.items()}
            if len(set(answers.values())) != 1:
                sys.exit("the two paths gave different answers")
            for _ in range(args.blocks):
                for name, fn in paths.items():
                    for _ in range(200):
                        fn(connection)
                    start = time.perf_counter()
                    for _ in range(args.reps):
                        fn(connection)
                    ms[name].append((time.perf_counter() - start) / args.reps * 1e3)
        reads.dispose()
        engine.dispose()
    finally:
        load._psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "code": load._code_version(), "host": {"python": platform.python_version()},
           "reps": args.reps, "blocks": args.blocks, "page_ms": ms,
           "median_ms": {name: statistics.median(v) for name, v in ms.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:  # append-only raw log
        fh.write(json.dumps(row) + "\n")
    sa, cur = row["median_ms"]["sqlalchemy"], row["median_ms"]["cursor"]
    print(f"one page of 20 jobs, read and rendered (median of {args.blocks} blocks of "
          f"{args.reps}): SQLAlchemy execute {sa:.3f} ms, ReadQuery {cur:.3f} ms "
          f"({(1 - cur / sa) * 100:.0f}% less)")


if __name__ == "__main__":
    main()
