"""What both ``BackupAndRestore`` callbacks share: their arguments, public attributes and lifecycle.

Each adapter's callback derives from :class:`BackupCallback` and its framework's ``Callback``, so
the same argument means the same thing, and is checked the same way, in Keras and in Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from unified_backup.lifecycle import BackupStats, Lifecycle
from unified_backup.manifest import Manifest
from unified_backup.options import EPOCH, RAISE, BackupOptions
from unified_backup.preemption import PreemptionWatch


def _ignore_phase(name: str) -> None:
    """The default phase listener: a module-level function, so callbacks stay picklable (ddp_spawn)."""


class BackupCallback:
    """Back up the training to ``backup_dir``; resume from it when ``fit`` starts again.

    Args:
        backup_dir: local folder that holds the single backup (other files in it are left alone).
        save_freq: ``"epoch"`` to back up at each epoch end, or N to back up every N optimizer steps.
        delete_checkpoint: delete the backup when ``fit`` returns normally (early stopping included).
        save_before_preemption: on SIGTERM (``True``) or the signals listed (e.g.
            ``["SIGTERM", "SIGUSR1"]``), back up at the next step boundary and stop.
        on_write_error: ``"raise"`` stops training when a backup cannot be written; ``"warn"``
            logs a warning and trains on. The last backup stays intact either way.
        keep_previous: also keep the backup before the newest, and restore it (with a warning)
            when the newest is refused as corrupt. Off by default; two backups on disk.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = EPOCH,
        delete_checkpoint: bool = True,
        save_before_preemption: bool | Sequence[str | int] = False,
        *,
        on_write_error: str = RAISE,
        keep_previous: bool = False,
        on_phase: Callable[[str], None] = _ignore_phase,
    ) -> None:
        super().__init__()
        self._options = BackupOptions(
            backup_dir,
            save_freq,
            delete_checkpoint,
            save_before_preemption,
            on_write_error=on_write_error,
            keep_previous=keep_previous,
        )
        if self._options.preemption_signals:
            PreemptionWatch.check_installable()  # raise now rather than be silently off later
        self._lifecycle = Lifecycle(self._options, on_phase=on_phase)

    @property
    def backup_dir(self) -> Path:
        return self._options.backup_dir

    @property
    def save_freq(self) -> str | int:
        return self._options.save_freq

    @property
    def delete_checkpoint(self) -> bool:
        return self._options.delete_checkpoint

    @property
    def save_before_preemption(self) -> bool | Sequence[str | int]:
        return self._options.save_before_preemption

    @property
    def on_write_error(self) -> str:
        return self._options.on_write_error

    @property
    def keep_previous(self) -> bool:
        return self._options.keep_previous

    @property
    def restored(self) -> Manifest | None:
        """The manifest of the backup that the current (or last) ``fit`` resumed from, or None."""
        return self._lifecycle.restored

    @property
    def stats(self) -> BackupStats:
        """What backing up cost during the current (or last) ``fit``."""
        return self._lifecycle.stats
