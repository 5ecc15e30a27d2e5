"""The job queue: Celery settings shared by the API (producer) and the worker (consumer).

Messages carry only a job id; the database row is the job's state. The API never imports the
worker's task code: it sends the task by name.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import filesystem as kombu_filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app.settings import Settings

RUN_JOB_TASK = "mipp.run_job"


class AtomicFilesystemChannel(kombu_filesystem.Channel):
    """kombu's filesystem channel, but a message file appears only once complete.

    kombu writes `<id>.<queue>.msg` in place while a polling worker may already move and
    read it: the worker then parses an empty or partial file and its consumer crashes (seen
    under load). Writing `<name>.part` and renaming makes the message appear atomically.
    """

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        part = final + ".part"  # not `<queue>.msg`: no reader picks it up
        try:
            with open(part, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(part, final)
        except OSError as exc:
            from kombu.exceptions import ChannelError

            raise ChannelError(f"cannot add message {name!r} to {self.data_folder_out}") from exc


class AtomicFilesystemTransport(kombu_filesystem.Transport):
    Channel = AtomicFilesystemChannel


# Every process that imports this module (API, worker, CLI) gets the atomic variant for
# `filesystem://` URLs.
TRANSPORT_ALIASES["filesystem"] = f"{__name__}:AtomicFilesystemTransport"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for long GPU jobs (see ../shared/references/service-practice.md)."""
    transport_options: dict[str, Any] = {}
    if settings.broker_url.startswith("filesystem"):
        folder = str(settings.broker_dir / "queue")
        transport_options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.broker_dir / "control"),
            "processed_folder": str(settings.broker_dir / "processed"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval_s,
        }
    elif settings.broker_url.startswith("sqla+"):
        transport_options = {"polling_interval": settings.broker_polling_interval_s}
    else:
        # Redis/SQS redeliver an unacked message after this; it must exceed the longest job.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "visibility_timeout": settings.visibility_timeout_s,
        "result_backend": None,
        "task_ignore_result": True,  # job state lives in the database
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,  # one process per GPU
        # 1: a fresh process per job, which frees CUDA memory and leaks (celery#6009).
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        "worker_hijack_root_logger": False,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.hard_time_limit_s,
        "task_default_queue": settings.default_queue,
        "task_create_missing_queues": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def ensure_broker_dirs(settings: Settings) -> None:
    """The filesystem transport needs its folders to exist before anyone connects."""
    if settings.broker_url.startswith("filesystem"):
        for name in ("queue", "control", "processed"):
            (settings.broker_dir / name).mkdir(parents=True, exist_ok=True)


def make_celery(settings: Settings, name: str = "mipp") -> Celery:
    ensure_broker_dirs(settings)
    celery = Celery(name)
    celery.conf.update(celery_config(settings))
    return celery


class JobQueue:
    """Enqueue job ids by name; the only thing the API knows about Celery."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.celery = make_celery(settings, name="mipp-api")

    def enqueue(self, job_id: str, queue: str, time_limit_s: int) -> None:
        self.celery.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=queue,
            soft_time_limit=time_limit_s,
            time_limit=time_limit_s + self.settings.hard_time_limit_grace_s,
        )

    def waiting(self, queue: str) -> int | None:
        """Messages waiting in `queue` (not counting those a worker holds); None if the
        broker cannot count them. Raises BrokerUnreachable when it does not answer."""
        from kombu.exceptions import ChannelError

        try:
            with self.celery.connection_for_write() as conn:
                self._connect(conn)
                with conn.channel() as channel:
                    return channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:  # Redis: an empty queue does not exist
            return 0
        except BrokerUnreachable:
            raise
        except Exception:  # noqa: BLE001 - unknown: the caller re-sends to be safe
            return None

    def check(self) -> None:
        """Raise BrokerUnreachable if the broker cannot be reached."""
        with self.celery.connection_for_write() as conn:
            self._connect(conn)

    @staticmethod
    def _connect(conn) -> None:
        # One retry 0.2 s later: kombu's default 2 s pause would hold a maintenance round
        # (and /readyz) for seconds during an outage.
        try:
            conn.ensure_connection(max_retries=1, interval_start=0.2, timeout=3)
        except Exception as exc:  # noqa: BLE001 - every transport raises its own
            raise BrokerUnreachable(f"{type(exc).__name__}: {exc}") from exc


class BrokerUnreachable(Exception):
    """The broker did not answer (connection refused or timed out)."""
