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


class CheckpointNotWritten(CheckpointError):
    """A checkpoint that could not be written (a full disk, a quota): its partial files are gone, the previous
    checkpoint is intact, and the same command resumes from it."""
