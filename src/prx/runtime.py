"""Device, precision and thread settings shared by training and inference."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from prx.errors import ConfigError, PrxError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible: use train.device=cpu (or auto)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it ('auto'), never by default on CPU (slow without AMX)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


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


class StopSignals:
    """Signals that ask a run to finish its current step, write a checkpoint and exit: Ctrl-C
    (SIGINT), SIGTERM (what Slurm, Kubernetes, spot instances and torchrun send) and SIGUSR1 (Slurm's
    warning before a time limit, ``--signal=USR1@120``). A second Ctrl-C stops at once (the last
    checkpoint stays intact). Each exits with its own code (128 + the signal number)."""

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.received)) if self.received else 0

    def _handle(self, signum, frame) -> None:
        import signal
        import sys

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            what = "interrupt (Ctrl-C)" if name == "SIGINT" else name
            again = " (Ctrl-C again to stop at once)" if name == "SIGINT" else ""
            print(f"\n{what}: finishing this step and saving a checkpoint{again}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        import signal

        for name in self.NAMES:
            try:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
            except ValueError:  # not the main thread: leave the process's handlers alone
                break
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()


class TimeBudget:
    """``train.time_budget_minutes``: train for about that long. The first ``SKIP`` steps of a
    process (compilation, caches) are not timed; the next ``MEASURE`` give the step rate, and the
    steps that fit the rest of the budget become the run's step count (at most ``train.steps``),
    so the LR schedule, whose decay covers the last part of the run, ends with the budget. The
    count is printed and kept in every checkpoint: ``train.time_budget_minutes=0 train.steps=N``
    trains exactly the same run again."""

    SKIP, MEASURE = 10, 30

    def __init__(self, minutes: float, first_step: int):
        self.seconds, self.first_step = minutes * 60, first_step
        self.started = time.monotonic()
        self.window_start: float | None = None

    def plan(self, step: int) -> int | None:
        """Call after each step (``step`` steps done); the run's step count once it is known, else None."""
        done = step - self.first_step
        if done == self.SKIP:
            self.window_start = time.monotonic()
        if done == self.SKIP + self.MEASURE and self.window_start is not None:
            rate = self.MEASURE / (time.monotonic() - self.window_start)
            left = self.seconds - (time.monotonic() - self.started)
            return step + max(0, int(left * rate))
        return None
