"""Celery application of the GPU workers.

    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker --pool prefork -c 1 -Q gpu-default

Settings (broker, database, store, limits) come from the same MIPP_* variables as the API;
see app.queue.celery_config for the long-job settings (acks_late, prefetch 1, a fresh process
per job, time limits, visibility timeout).
"""

from __future__ import annotations

from celery.concurrency import asynpool
from celery.signals import worker_init, worker_process_init, worker_ready

from app.queue import RUN_JOB_TASK, make_celery
from app.settings import get_settings
# torch-free at import (a `celery inspect ping` health check stays fast); the worker node's
# parent preloads torch at worker_init, and each job process inherits it by fork.
from worker import runner

import mipp.errors  # noqa: F401  (torch-free too)

# With a fresh process per job, the pool replaces a child when it notices the exit. The exit
# can race the pool's own check, and then the replacement waits for the next periodic
# maintenance, every 5 s by default: measured as 1-4.5 s submit->start with Redis
# (bench/bench_queue_latency.py). Checking every 0.2 s costs nothing.
POOL_MAINTAIN_INTERVAL_S = 0.2
asynpool.AsynPool.timers = property(lambda self: {self.maintain_pool: POOL_MAINTAIN_INTERVAL_S})

settings = get_settings()
celery = make_celery(settings, name="mipp-worker")
app = celery  # `celery -A worker.celery_app` finds `app` or `celery`


@worker_init.connect
def _warm_database(**_kwargs) -> None:
    try:
        runner.warm_database(settings)
    except Exception:  # noqa: BLE001 - the job process connects (and reports) on its own
        runner.log.warning("could not reach the database at start-up", exc_info=True)


@worker_init.connect
def _preload_engine(**_kwargs) -> None:
    try:
        runner.preload_engine()
    except Exception:  # noqa: BLE001 - each job process imports what it needs itself
        runner.log.warning("could not preload torch and the engine", exc_info=True)


@worker_ready.connect
def _recover_after_restart(sender=None, **_kwargs) -> None:
    """A (re)started worker node: its jobs whose process is gone are re-queued now, not
    after the stale-heartbeat delay, and scratch folders of dead job processes go."""
    try:
        runner.remove_abandoned(settings.tmp_dir, ("job",))
        runner.recover_orphans(settings, sender.hostname)
        runner.database(settings).dispose()  # job processes open their own connections
    except Exception:  # noqa: BLE001 - the API's sweeper still catches them later
        runner.log.warning("could not recover this node's orphaned jobs", exc_info=True)


@worker_process_init.connect
def _fresh_connections(sender=None, **_kwargs) -> None:
    runner.after_fork()
    # A pool process starts when the previous one ended, or was killed mid-job (SIGKILL, the
    # OOM killer): re-queue its job now, not a stale-heartbeat delay later. The broker's
    # redelivery of that message may reach another node first, which cannot claim it.
    try:
        runner.recover_orphans(settings, sender or "worker")
    except Exception:  # noqa: BLE001 - the API's sweeper still catches it later
        runner.log.warning("could not recover this node's orphaned jobs", exc_info=True)


@celery.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True)
def run_job(self, job_id: str) -> str:
    """Run job `job_id` (the message carries nothing else); returns the outcome."""
    return runner.run_job(job_id, settings=settings, worker_name=self.request.hostname or "worker")
