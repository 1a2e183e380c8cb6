"""unified-backup for Lightning: ``BackupAndRestore`` for ``lightning.pytorch``.

``lightning_impl.pl.BackupAndRestore`` is the same callback for the ``pytorch_lightning`` namespace.
"""

from __future__ import annotations

from unified_backup.errors import MissingFrameworkError

try:
    import lightning
    import lightning.pytorch
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise MissingFrameworkError(
        f"lightning_impl needs torch and lightning, which could not be imported ({exc}). "
        "Install them with: pip install 'unified-backup[lightning]'"
    ) from exc

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_impl.callback import BackupAndRestoreMixin
from unified_backup.preemption import TrainingPreempted


class Preempted(TrainingPreempted, SIGTERMException):
    """``TrainingPreempted`` that is also Lightning's ``SIGTERMException``, for ``on_exception`` code."""


class BackupAndRestore(BackupAndRestoreMixin, lightning.pytorch.Callback):
    __doc__ = BackupAndRestoreMixin.__doc__
    preempted_error = Preempted
    _message_logger = "lightning.pytorch.utilities.rank_zero"
    _namespace = "lightning.pytorch"
    _import = "from lightning_impl import BackupAndRestore"
    _trainer_class = lightning.pytorch.Trainer
    framework_version = lightning.__version__


__all__ = ["BackupAndRestore"]
