"""Every error a user can act on derives from :class:`RocketError`.

The CLI catches ``RocketError`` and prints its message as one line (exit code 2); anything
else is a bug and keeps its traceback. Each class also derives from the built-in exception
it replaced, so ``except ValueError`` in existing callers keeps working.
"""
from __future__ import annotations


class RocketError(Exception):
    """Base of every error whose message tells the user what to do."""


class ConfigError(RocketError, ValueError):
    """A configuration value is out of range; the message says which and how to fix it."""


class DataError(RocketError, ValueError):
    """Calibration or evaluation data is missing or unusable."""


class MissingDataError(RocketError, FileNotFoundError):
    """A zero-shot task's local data files are missing."""


class ModelLoadError(RocketError, RuntimeError):
    """The model could not be found or loaded; the message says how to fix it."""


class UnsupportedModelError(RocketError, ValueError):
    """The model's structure is not one rocketlm can compress; the message says what is missing."""


class CalibrationError(RocketError, RuntimeError):
    """Calibration produced unusable statistics (e.g. non-finite activations)."""


class WhiteningError(RocketError, RuntimeError):
    """A Gram matrix cannot be whitened even after the eps shift."""


class ErrorMismatchError(RocketError, RuntimeError):
    """The factors built for shipping do not reproduce the profiled error."""


class InfeasibleAllocationError(RocketError, ValueError):
    """The target ratio cannot be met with the profiled candidates; the message says how to fix it."""


class ProfileMismatchError(RocketError, ValueError):
    """Stored profiles were made for another cost or budget than the one asked for; the message says how to fix it."""


class CheckpointError(RocketError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says what and how to fix it."""


class OutputDirError(RocketError, FileExistsError):
    """The output directory cannot be written safely (not writable, or holds something else)."""


class MissingDependencyError(RocketError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""
