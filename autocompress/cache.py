"""The user's cache folder: trained built-in models and calibrated targets live here."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$AUTOCOMPRESS_CACHE`` if set, else ``~/.cache/autocompress``."""
    env = os.environ.get("AUTOCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autocompress"
