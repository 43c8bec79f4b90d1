"""Where prx keeps files it derives, and the checks before it writes any."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prx.errors import PrxError


def cache_root() -> Path:
    """Where prx keeps derived files it can rebuild (``$PRX_CACHE``, default ``~/.cache/prx``)."""
    return Path(os.environ.get("PRX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prx")))


def make_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` and prove it writable, or fail with a one-line fix. The probe file has a
    unique name: every rank of a run checks the same directory at the same time."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        raise PrxError(f"cannot write to {what} '{path}' ({e.strerror}): choose another with --out") from None
    return path
