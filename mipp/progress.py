"""Progress reporting: one callback the CLI (progress bar) and the worker (database row) share."""

from __future__ import annotations

from typing import Protocol


class Phase:
    """Phase names reported through `ProgressCallback`, in the order a run visits them."""

    LOADING = "loading"
    TRAINING = "training"
    EVALUATING = "evaluating"
    CAPTURING = "capturing"
    SELECTING = "selecting"
    PRUNING = "pruning"
    REFITTING = "refitting"
    RETRAINING = "retraining"
    SAVING = "saving"


class ProgressCallback(Protocol):
    """`progress(phase, fraction, message)`; fraction is in [0, 1] within the phase.

    A callback may raise `mipp.errors.Cancelled` to stop the run at the next step.
    """

    def __call__(self, phase: str, fraction: float, message: str = "") -> None: ...


def no_progress(phase: str, fraction: float, message: str = "") -> None:
    """The default callback: report nothing."""
