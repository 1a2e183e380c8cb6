"""The exception tree of unified-backup.

Every error the library raises derives from :class:`BackupError` and its message says
what was expected, what was found, and what the user can do::

    BackupError
    ├── InvalidArgumentError (ValueError)       a constructor argument is wrong
    ├── UnsupportedEnvironmentError (RuntimeError)  e.g. TensorFlow eager execution is off
    ├── MissingFrameworkError (ImportError)     an adapter's framework is not installed
    ├── BackupDirInUseError                     another live training owns ``backup_dir``
    ├── NoBackupError (FileNotFoundError)       nothing is committed in ``backup_dir``
    ├── BackupWriteError (OSError)              a backup could not be written; the old one stays
    ├── TrainingPreempted (SystemExit)          stopped on a signal after a backup (preemption.py)
    └── InvalidBackupError                      a committed backup is refused; nothing was loaded
        ├── CorruptBackupError                  checksum, size, missing or extra file, bad manifest
        ├── UnsupportedFormatError              unknown manifest format or version
        ├── IncompatibleBackupError             other framework, or different variables
        └── UnsafeBackupError                   loading would run code stored in the backup
"""

from __future__ import annotations


class BackupError(Exception):
    """Root of every error raised by unified-backup."""


class InvalidArgumentError(BackupError, ValueError):
    """An argument has a value the library cannot use."""


class UnsupportedEnvironmentError(BackupError, RuntimeError):
    """The framework runs in a mode the library cannot support."""


class MissingFrameworkError(BackupError, ImportError):
    """An adapter was imported without its framework installed."""


class BackupDirInUseError(BackupError):
    """Another live training holds the lock on ``backup_dir``."""


class NoBackupError(BackupError, FileNotFoundError):
    """``backup_dir`` holds no committed backup."""


class BackupWriteError(BackupError, OSError):
    """Writing a backup failed; the previously committed backup is intact."""


class InvalidBackupError(BackupError):
    """A committed backup was refused before anything was loaded."""


class CorruptBackupError(InvalidBackupError):
    """A file of the backup is missing, extra, truncated or altered."""


class UnsupportedFormatError(InvalidBackupError):
    """The manifest's format or major version is not one this library reads."""


class IncompatibleBackupError(InvalidBackupError):
    """The backup describes other variables, or another framework, than the live training."""


class UnsafeBackupError(InvalidBackupError):
    """Loading the backup would execute code stored in it (for example a pickle)."""


__all__ = [
    "BackupDirInUseError",
    "BackupError",
    "BackupWriteError",
    "CorruptBackupError",
    "IncompatibleBackupError",
    "InvalidArgumentError",
    "InvalidBackupError",
    "MissingFrameworkError",
    "NoBackupError",
    "UnsafeBackupError",
    "UnsupportedEnvironmentError",
    "UnsupportedFormatError",
]
