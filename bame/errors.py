"""User-facing errors.

Every error a user can cause (a wrong N:M, a missing data file, a mismatched checkpoint ...) is raised
as a :class:`BameError` with a one-line message. The command line prints that line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BameError(Exception):
    """An error caused by the user's input, with a message fit to print on one line."""

    exit_code: int = 2


class ConfigError(BameError):
    """An invalid option or combination of options."""


class DataError(BameError):
    """A missing, truncated or corrupt dataset."""


class CheckpointError(BameError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(BameError):
    """Training cannot go on (for example a NaN loss)."""

    exit_code = 3
