"""``BackupAndRestore`` for the ``pytorch_lightning`` namespace (the same callback as ``lightning_impl``)."""

from __future__ import annotations

from unified_backup.errors import MissingFrameworkError

try:
    import pytorch_lightning
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise MissingFrameworkError(
        f"lightning_impl.pl needs pytorch_lightning, which could not be imported ({exc}). "
        "Install it with: pip install 'unified-backup[lightning]'"
    ) from exc

from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_impl.callback import BackupAndRestoreMixin
from unified_backup.preemption import TrainingPreempted


class Preempted(TrainingPreempted, SIGTERMException):
    """``TrainingPreempted`` that is also Lightning's ``SIGTERMException``, for ``on_exception`` code."""


class BackupAndRestore(BackupAndRestoreMixin, pytorch_lightning.Callback):
    __doc__ = BackupAndRestoreMixin.__doc__
    preempted_error = Preempted
    _message_logger = "pytorch_lightning.utilities.rank_zero"
    _namespace = "pytorch_lightning"
    _import = "from lightning_impl.pl import BackupAndRestore"
    _trainer_class = pytorch_lightning.Trainer
    framework_version = pytorch_lightning.__version__


__all__ = ["BackupAndRestore"]
