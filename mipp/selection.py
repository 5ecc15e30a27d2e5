"""Compatibility: the selection contract lives in mipp.methods (context, allocation, one file
per method) and the registry in mipp.method_registry."""

from __future__ import annotations

from dataclasses import dataclass

from mipp.methods import context as _context
from mipp.methods.allocation import select  # noqa: F401
from mipp.methods.context import Selection, removed_fraction  # noqa: F401
from mipp.methods.mipp import search_tol, select_mipp  # noqa: F401


@dataclass
class SelectionContext(_context.SelectionContext):
    """The former context, which took per-layer `counts`; they now go into `config.counts`."""

    counts: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.counts is not None:
            self.config = self.config.model_copy(update={"counts": dict(self.counts)})
