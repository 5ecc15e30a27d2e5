"""One maintenance round, run by the API every `MIPP_SWEEPER_INTERVAL_S` (and by a worker at
start): nothing is lost or stuck as long as one API process runs it.

1. stale heartbeats: re-queue or end running jobs whose worker went quiet (`sweep_stale`);
2. unsent jobs: send every queued job that has no message, e.g. after the broker was down
   during a submit or a sweep (`send_unsent`);
3. lost messages: send again queued jobs unclaimed `MIPP_RECONCILE_AFTER_S` after their
   send when the broker holds fewer messages than there are queued jobs (`reconcile`);
4. scratch folders of processes that died (`remove_abandoned`);
5. housekeeping: ended jobs past `MIPP_JOB_RETENTION_DAYS` deleted with their files, and every
   `MIPP_GC_INTERVAL_S` the store objects no row refers to (app.core.housekeeping).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from app.core import jobs
from app.core.artifacts import SweptLogs
from app.core.housekeeping import housekeeper
from app.core.scratch import remove_abandoned
from app.db import session_scope

log = logging.getLogger("mipp.maintenance")


@dataclass
class MaintenanceReport:
    requeued: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    removed_scratch: list[str] = field(default_factory=list)
    deleted_jobs: list[str] = field(default_factory=list)
    removed_objects: list[str] = field(default_factory=list)


def run_maintenance(sessionmaker, queue, store, settings) -> MaintenanceReport:
    report = MaintenanceReport()
    report.removed_scratch = remove_abandoned(settings.tmp_dir)
    with session_scope(sessionmaker) as session:
        dead = jobs.sweep_stale(session, stale_after_s=settings.stale_heartbeat_s,
                                max_attempts=settings.max_attempts,
                                attempt_logs=SweptLogs(store, settings.tmp_dir))
        report.requeued, report.ended = dead.requeued, dead.ended
        report.sent = jobs.send_unsent(session, queue)
        report.resent = jobs.reconcile(session, queue, resend_after_s=settings.reconcile_after_s)
    kept = housekeeper.run(sessionmaker, store, settings)
    report.deleted_jobs, report.removed_objects = kept.deleted_jobs, kept.removed_objects
    if report.requeued or report.ended:
        log.warning("sweeper: re-queued %s, ended %s", report.requeued, report.ended)
    return report
