"""Errors a user can cause and fix, as distinct from bugs.

Every one of these carries a message that names the key, file, row or field at fault and says how to fix
it. The ``lightning-pref`` command prints such an error as one line and exits with status 2; any other
exception is a bug and keeps its traceback (``LIGHTNING_PREF_DEBUG=1`` shows the traceback of user errors
too). Each class also derives from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: an error in the configuration, the data, a checkpoint or the command line."""


class ConfigError(UserError, ValueError):
    """An option out of range, of the wrong kind, or not applicable to the chosen method or backbone."""


class DataError(UserError, ValueError):
    """Input data that cannot be used: a table row, a shard, a sample, a label, a tensor."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user gave does not exist or holds nothing usable."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read safely, or that does not match the run resuming from it."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on: a NaN or infinite loss, gradient or weight (the message names step and term)."""


def check_whole_numbers(least: int = 1, **values: object) -> None:
    """Raise a ``ConfigError`` naming the first of ``values`` that is not a whole number of at least ``least``
    (a ``bool`` is not a number here).

    Example:
        >>> check_whole_numbers(steps=3, batch_size=0)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: batch_size=0: use a whole number >= 1.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name}={value!r}: use a whole number >= {least}.")
