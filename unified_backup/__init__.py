"""unified-backup: one resume contract for Keras and PyTorch Lightning.

This package is the framework-free core; ``keras_impl`` and ``lightning_impl`` adapt it.
"""

from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import (
    BackupDirInUseError,
    BackupError,
    BackupWriteError,
    CorruptBackupError,
    IncompatibleBackupError,
    InvalidArgumentError,
    InvalidBackupError,
    MissingFrameworkError,
    NoBackupError,
    UnsafeBackupError,
    UnsupportedEnvironmentError,
    UnsupportedFormatError,
)
from unified_backup.lifecycle import BackupStats, Lifecycle
from unified_backup.manifest import Counters, Header, Manifest
from unified_backup.options import BackupOptions
from unified_backup.preemption import EXIT_PREEMPTED, TrainingPreempted
from unified_backup.slot import Slot
from unified_backup.state import Position, TrainingState

__version__ = "0.1.0"

__all__ = [
    "BackupDirInUseError",
    "BackupError",
    "BackupOptions",
    "BackupStats",
    "BackupWriteError",
    "Coordinator",
    "CorruptBackupError",
    "Counters",
    "EXIT_PREEMPTED",
    "Header",
    "IncompatibleBackupError",
    "InvalidArgumentError",
    "InvalidBackupError",
    "Lifecycle",
    "Manifest",
    "MissingFrameworkError",
    "NoBackupError",
    "Position",
    "SingleProcess",
    "Slot",
    "TrainingPreempted",
    "TrainingState",
    "UnsafeBackupError",
    "UnsupportedEnvironmentError",
    "UnsupportedFormatError",
    "__version__",
]
