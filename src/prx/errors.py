"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits non-zero."""


class PrxError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(PrxError):
    """A config file, key, type or value that cannot work."""


class CheckpointError(PrxError):
    """A checkpoint that is missing, incomplete, or from an incompatible config."""


class TrainingError(PrxError):
    """A run that cannot go on (e.g. too many non-finite losses)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are truncated, altered or unreadable (not one of another config)."""

    @classmethod
    def at(cls, path, what: str) -> "CheckpointDamaged":
        return cls(f"checkpoint '{path}' is damaged: {what}")


class CheckpointNotWritten(CheckpointError):
    """A checkpoint that could not be written (a full disk, a quota): its partial files are gone, the previous
    checkpoint is intact, and the same command resumes from it."""


def os_errors_behind(error: BaseException | None):
    """The operating system's errors behind ``error``, nearest first: OSErrors in its chain (causes, contexts),
    on whichever rank of a ``torch.distributed.checkpoint`` failure (its ``failures``), and those a library
    names only in its message (safetensors: "I/O error: No space left on device (os error 28)")."""
    import os
    import re

    stack, seen = [error], set()
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            yield e
        elif (number := re.search(r"\(os error (\d+)\)", str(e))) is not None:
            yield OSError(int(number[1]), os.strerror(int(number[1])))
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> (exception, trace)
        if isinstance(failures, dict):
            stack += [wrapped for wrapped, _ in failures.values()]
        stack += [e.__cause__, e.__context__]

