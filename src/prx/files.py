"""Where prx keeps files it derives, and the checks before it writes any."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prx.errors import PrxError
from prx.rundir import inside_checkpoint


def cache_root() -> Path:
    """Where prx keeps derived files it can rebuild (``$PRX_CACHE``, default ``~/.cache/prx``)."""
    return Path(os.environ.get("PRX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prx")))


def refuse_inside_checkpoint(path: str | Path, what: str = "--out") -> None:
    """A one-line error when ``path`` lies inside a run's checkpoints: only the trainer writes there (an extra file
    makes a checkpoint damaged, and pruning would delete it)."""
    inside = inside_checkpoint(path)
    if inside is not None:
        raise PrxError(f"{what} '{path}' is inside {inside}: only prx train writes in a run's checkpoints (another "
                       f"file there makes a checkpoint damaged, and pruning deletes it); choose a path outside it")


def make_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` and prove it writable, or fail with a one-line fix (also inside a run's checkpoints, which
    only the trainer writes). The probe file has a unique name: every rank of a run checks the same directory at
    the same time."""
    refuse_inside_checkpoint(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        raise PrxError(f"cannot write to {what} '{path}' ({e.strerror}): choose another with --out") from None
    return path
