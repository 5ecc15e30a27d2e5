"""What a running job shows while it runs: progress over the whole job with an ETA for the
current phase, and its log lines, readable through the API before the job ends.

`JobProgress` turns the engine's (phase, fraction-within-phase) into a fraction of the whole
job, monotone across phases; `LogLineBuffer` is a logging handler that keeps the job's lines
until the worker flushes them to the database (GET /jobs/{id}/log reads them from there,
whichever host the API runs on).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

# The phases a job visits, in order, with their usual share of a job's time (a guess that
# only shapes the overall bar; the per-phase fraction and ETA are measured).
PHASE_ORDER = ("starting", "loading", "evaluating", "capturing", "selecting", "pruning",
               "refitting", "retraining", "saving", "uploading")


def phase_weights(config: dict[str, Any]) -> dict[str, float]:
    """Relative cost of each phase for this job's PruneConfig (as a dict), summing to 1."""
    retrain_epochs = (config.get("retrain") or {}).get("epochs", 1)
    mipp = config.get("method", "mipp") == "mipp"
    searches = mipp and config.get("target") is not None
    weights = {
        "starting": 0.01, "loading": 0.05, "evaluating": 0.01, "capturing": 0.02,
        "selecting": (0.75 if searches else 0.55) if mipp else 0.08,
        "pruning": 0.01, "refitting": 0.04 if config.get("refit", True) else 0.0,
        "retraining": min(0.6, 0.08 * retrain_epochs) if retrain_epochs else 0.0,
        "saving": 0.01, "uploading": 0.03,
    }
    total = sum(weights.values())
    return {phase: w / total for phase, w in weights.items()}


class JobProgress:
    """Overall progress and a per-phase ETA from the engine's (phase, fraction) reports."""

    def __init__(self, config: dict[str, Any], clock=time.monotonic):
        self.weights = phase_weights(config)
        self.clock = clock
        self.phase: str | None = None
        self.phase_started = clock()
        self.overall = 0.0

    def update(self, phase: str, fraction: float) -> tuple[float, float | None]:
        """Record a report; returns (overall fraction 0-1, seconds left in the phase or None)."""
        now = self.clock()
        fraction = min(max(fraction, 0.0), 1.0)
        if phase != self.phase:
            self.phase, self.phase_started = phase, now
        if phase in self.weights:
            index = PHASE_ORDER.index(phase)
            done = sum(self.weights[p] for p in PHASE_ORDER[:index])
            # Never backwards: a phase visited again (a baseline's own capture) holds the bar.
            self.overall = max(self.overall, min(1.0, done + self.weights[phase] * fraction))
        elapsed = now - self.phase_started
        eta = None
        if 0.02 <= fraction < 1.0 and elapsed >= 1.0:
            eta = elapsed * (1.0 - fraction) / fraction
        return self.overall, eta


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LogLineBuffer(logging.Handler):
    """Keeps formatted log lines until `take()`; at most `max_lines` per job go to the
    database (the complete log is the artifact log.txt)."""

    def __init__(self, max_lines: int = 20_000):
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._kept = 0
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not break the job
            self.handleError(record)
            return
        with self._lock_lines:
            for line in text.split("\n"):  # exactly the lines log.txt gets
                if self._kept < self.max_lines:
                    self._lines.append(line)
                elif self._kept == self.max_lines:
                    self._lines.append(f"... more than {self.max_lines} lines: the rest is in "
                                       "the artifact log.txt when the job ends")
                self._kept += 1

    def take(self) -> list[str]:
        with self._lock_lines:
            lines, self._lines = self._lines, []
        return lines
