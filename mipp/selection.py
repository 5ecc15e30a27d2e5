"""Compatibility: the selection contract now lives in mipp.methods (context, one file per
method). Importing this module registers every method."""

from mipp.methods.context import (SELECTORS, Selection, SelectionContext,  # noqa: F401
                                  register_selector, removed_fraction, select)
from mipp.methods.mipp import search_tol, select_mipp  # noqa: F401
import mipp.baselines  # noqa: E402, F401  (registers the baselines; moves to mipp.methods next)
