"""Backwards-compatible name of the corpus read API; the format lives in :mod:`spavis.format`."""
from __future__ import annotations

from spavis.format.corpus import *  # noqa: F401,F403
from spavis.format.corpus import __all__  # noqa: F401
