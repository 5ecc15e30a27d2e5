"""Errors a user can cause. Each message names the field or file and the fix.

The service maps `MippError` subclasses to 4xx answers and job failure reasons;
anything else is a bug in our code.
"""


class MippError(Exception):
    """Base class of every error a user can cause with bad input."""


class DataError(MippError):
    """A dataset is malformed: wrong shapes, dtypes, label range, too few samples."""


class ModelError(MippError):
    """A model cannot be built or loaded: unknown architecture, mismatching weights."""


class ConfigError(MippError):
    """A pruning or training setting is out of range or inconsistent."""


class Cancelled(Exception):
    """Raised from a progress callback to stop a run between steps (not a user error)."""
