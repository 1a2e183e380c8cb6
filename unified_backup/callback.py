"""What both ``BackupAndRestore`` callbacks share: their arguments, public attributes and lifecycle.

Each adapter's callback derives from :class:`BackupCallback` and its framework's ``Callback``, so
the same argument means the same thing, and is checked the same way, in Keras and in Lightning.
The arguments are declared once, by :class:`BackupOptions`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_backup.lifecycle import BackupStats, Lifecycle
from unified_backup.manifest import Manifest
from unified_backup.options import BackupOptions
from unified_backup.preemption import PreemptionWatch, TrainingPreempted

log = logging.getLogger(__name__)


class BackupCallback:
    """Back up the training to ``backup_dir``; resume from it when ``fit`` starts again.

    Args:
        backup_dir: local folder that holds the single backup (other files in it are left alone).
        save_freq: ``"epoch"`` to back up at each epoch end, N to back up every N optimizer steps, or
            ``False``: no periodic backup, only the one ``save_before_preemption`` makes.
        delete_checkpoint: delete the backup when ``fit`` returns normally (early stopping included).
        save_before_preemption: on SIGTERM (``True``) or the signals listed (e.g.
            ``["SIGTERM", "SIGUSR1"]``), back up at the next step boundary and stop.
        on_write_error: ``"raise"`` stops training when a backup cannot be written; ``"warn"``
            logs a warning and trains on. The last backup stays intact either way.
        keep_previous: also keep the backup before the newest, and restore it (with a warning)
            when the newest is refused as corrupt. Off by default; two backups on disk.
        resume: ``"auto"`` (default) restores a backup if there is one and otherwise starts
            fresh, with a warning when there are signs of a restart (a run on this folder that did
            not finish, or the scheduler's restart counter); ``"required"`` raises
            ``NoBackupError`` naming ``backup_dir`` when there is nothing to restore.
        verbose: print one line when a backup is restored, through the framework's own channel
            (Keras's message printing, Lightning's rank-zero info). ``False``: only log it.
        async_backup: pause training only to copy the state in memory; a background thread
            writes and commits the backup while training goes on (one at a time: the next backup
            point waits for it). A failed write is reported at the next backup point or when
            ``fit`` ends, by ``on_write_error``; a preemption backup is written at once. One
            process only; one extra copy of the state in host memory.

    After a ``fit``, ``restored`` is the manifest of the backup it resumed from (or None) and
    ``stats`` counts its backups, the seconds training waited for them (with ``async_backup``, for
    the snapshots), the seconds a background writer spent (``writer_seconds``), and the seconds
    the restore took as ``fit`` began (``restore_seconds``, verification included).
    """

    #: Raised when a preemption signal stopped training (an adapter may add its framework's class).
    preempted_error: type[TrainingPreempted] = TrainingPreempted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._options = BackupOptions(*args, **kwargs)
        if self._options.preemption_signals:
            PreemptionWatch.check_installable()  # raise now rather than be silently off later
        self._lifecycle = Lifecycle(self._options, preempted=self.preempted_error, announce=self._announce)
        if self._options.save_freq is False and not self._options.preemption_signals:
            log.warning(
                "BackupAndRestore(save_freq=False) without save_before_preemption never backs up: it only "
                "restores a backup found in %s. Pass save_before_preemption=True to back up on SIGTERM.",
                self._options.backup_dir,
            )

    __init__.__signature__ = inspect.signature(BackupOptions.__init__)  # type: ignore[attr-defined]

    def _announce(self, line: str) -> None:
        """Show ``line`` (the restore line) where the framework shows its own messages: each adapter
        overrides this. Called on the primary process only, and only with ``verbose``."""

    def release(self) -> None:
        """End the current ``fit``'s hold on ``backup_dir``: unlock it and remove the signal handlers.

        The backup stays. In Lightning the callback does this by itself when ``fit`` raises
        (``on_exception``); Keras calls no hook then, so the folder stays locked by this process
        until its next ``fit`` with a ``BackupAndRestore`` on the folder in this thread, or until the
        process ends. Call it after a Keras ``fit`` raised (e.g. Ctrl-C in a notebook) to let another
        process resume from the backup now. With ``async_backup`` it first waits for the backup
        being written in the background.
        """
        self._lifecycle.finish(success=False)

    @property
    def backup_dir(self) -> Path | str:
        return self._options.backup_dir

    @property
    def save_freq(self) -> str | int | bool:
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
    def resume(self) -> str:
        return self._options.resume

    @property
    def verbose(self) -> bool:
        return self._options.verbose

    @property
    def async_backup(self) -> bool:
        return self._options.async_backup

    @property
    def restored(self) -> Manifest | None:
        """The manifest of the backup that the current (or last) ``fit`` resumed from, or None."""
        return self._lifecycle.restored

    @property
    def stats(self) -> BackupStats:
        """What backing up cost during the current (or last) ``fit``."""
        return self._lifecycle.stats
