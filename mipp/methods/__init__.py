"""Selection methods, one file per method, each registering itself when imported here."""

from mipp.methods import mipp as _mipp  # noqa: F401
