"""Errors that the tools report as one clear message instead of a traceback."""
from __future__ import annotations


class UsageError(RuntimeError):
    """Something the user has to fix (a path, a config value); the message says how."""


class ConfigNotFoundError(UsageError, FileNotFoundError):
    """The config file does not exist."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data root, annotation file or image folder named by the config does not exist."""


class CheckpointNotFoundError(UsageError, FileNotFoundError):
    """A checkpoint named on the command line or in the config does not exist."""


class ConfigMismatchError(UsageError, ValueError):
    """Parts of a config do not fit together (widths, class counts, arch names)."""


class CheckpointMismatchError(UsageError, ValueError):
    """A checkpoint does not fit the model built from the config."""


class MissingFilesError(DataNotFoundError, CheckpointNotFoundError):
    """Data and checkpoints are missing, all reported in one message."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions the tools report as one ``error:`` line with exit status 2.

    :class:`UsageError` and the errors raised further down whose cause is the user's input:
    a truncated or damaged checkpoint, a checkpoint that would run code when loaded (its message
    names the per-file opt-in), a batch the backbone cannot take (empty, wrong channel count) and
    a training step with NaN / inf input images or losses.
    """
    from ..engine.hooks import NonFiniteTrainingError
    from ..models.utils.image_batch import ImageBatchError
    from ..utils.safe_checkpoint import CorruptCheckpointError, UnsafeCheckpointError
    return (UsageError, CorruptCheckpointError, UnsafeCheckpointError, ImageBatchError,
            NonFiniteTrainingError)
