"""The arguments shared by both ``BackupAndRestore`` callbacks, validated once, the same way."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_backup.errors import InvalidArgumentError
from unified_backup.preemption import parse_signals
from unified_backup.store import REMOTE_PROTOCOLS, is_remote, redact

EPOCH = "epoch"
RAISE = "raise"
WARN = "warn"
AUTO = "auto"
REQUIRED = "required"


@dataclasses.dataclass(frozen=True)
class BackupOptions:
    """What ``BackupAndRestore(backup_dir, save_freq, delete_checkpoint, save_before_preemption)`` means.

    Attributes:
        backup_dir: the folder that holds the single backup slot: a local path (a ``Path``), or the
            URL of a prefix in an object store, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (a
            ``str``, without a trailing slash).
        save_freq: ``"epoch"`` to back up at each epoch end, N to back up every N optimizer steps, or
            ``False`` for no periodic backup (only the one ``save_before_preemption`` makes).
        delete_checkpoint: delete the backup when ``fit`` returns normally.
        save_before_preemption: on SIGTERM (``True``) or the listed signals, back up at the next
            step boundary and stop with :class:`TrainingPreempted` (exit code 143).
        preemption_signals: the signals ``save_before_preemption`` names (empty when off).
        on_write_error: when a backup cannot be written (disk full, I/O error, read-only folder),
            ``"raise"`` stops training with :class:`BackupWriteError`; ``"warn"`` logs a warning
            and trains on. Either way the last backup stays committed and intact.
        keep_previous: also keep the backup before the newest (a second slot, like Keras 3's
            ``double_checkpoint``); when the newest is refused as corrupt at start, restore that
            one instead, with a warning. Two backups on disk (three while one is written).
        resume: ``"auto"`` restores the backup if there is one and starts fresh otherwise (with a
            warning when there are signs that this run is a restart); ``"required"`` raises
            :class:`NoBackupError` naming ``backup_dir`` when there is nothing to restore.
        verbose: print one line through the framework's own channel when a backup is restored.
        async_backup: training stops only while the state is copied in memory (a snapshot); a
            background thread writes and commits it while training goes on. One backup is written
            at a time: a backup point waits for the write before it. A write that failed is reported
            at the next backup point or when ``fit`` ends, by ``on_write_error``. A preemption
            backup is written at once. One process only; costs one copy of the state in memory.
        storage_options: with a remote ``backup_dir``, passed to its fsspec filesystem (``s3fs``,
            ``gcsfs``) as they are: credentials, endpoint, profile. Never written or shown.
        staging_dir: with a remote ``backup_dir``, the local folder where a backup is written before
            it is uploaded, and downloaded before it is loaded (default: the system's temporary folder).
    """

    backup_dir: Path | str
    save_freq: str | int | bool = EPOCH
    delete_checkpoint: bool = True
    save_before_preemption: bool | tuple[str | int, ...] = False
    on_write_error: str = RAISE
    keep_previous: bool = False
    resume: str = AUTO
    verbose: bool = True
    async_backup: bool = False
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    staging_dir: Path | None = None
    preemption_signals: tuple[signal.Signals, ...] = ()

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = EPOCH,
        delete_checkpoint: bool = True,
        save_before_preemption: bool | Sequence[str | int] = False,
        *,
        on_write_error: str = RAISE,
        keep_previous: bool = False,
        resume: str = AUTO,
        verbose: bool | int = True,
        async_backup: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(backup_dir, (str, os.PathLike)) or not str(backup_dir):
            raise InvalidArgumentError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={backup_dir!r}. "
                "Expected a non-empty path to a folder, e.g. 'backup/'."
            )
        remote = is_remote(backup_dir)
        if str(backup_dir).startswith("file://"):
            backup_dir = str(backup_dir)[len("file://") :]
        if remote:
            check_url(str(backup_dir))
        else:
            _check_is_a_folder(Path(backup_dir))
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidArgumentError(
                f"Invalid value for argument `storage_options`. Received: storage_options of type "
                f"{type(storage_options).__name__}. Expected a dict of the store's fsspec options, e.g. "
                "{'profile': 'training'} for s3:// or {'project': 'my-project'} for gs://."
            )
        if storage_options and not remote:
            raise InvalidArgumentError(
                f"Invalid value for argument `storage_options`: it configures a remote store, but "
                f"backup_dir={str(backup_dir)!r} is a local folder. Expected an s3:// or gs:// backup_dir, "
                "or no storage_options."
            )
        if staging_dir is not None and (
            not isinstance(staging_dir, (str, os.PathLike)) or not str(staging_dir) or is_remote(staging_dir)
        ):
            raise InvalidArgumentError(
                f"Invalid value for argument `staging_dir`. Received: staging_dir={staging_dir!r}. Expected "
                "a local folder where a remote backup is written before it is uploaded (default: the "
                "system's temporary folder)."
            )
        if (
            save_freq is not False
            and save_freq != EPOCH
            and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq <= 0)
        ):
            raise InvalidArgumentError(
                f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
                "Expected 'epoch', a positive integer number of optimizer steps, or False (back up only "
                "on preemption)."
            )
        if not isinstance(delete_checkpoint, bool):
            raise InvalidArgumentError(
                f"Invalid value for argument `delete_checkpoint`. Received: delete_checkpoint="
                f"{delete_checkpoint!r}. Expected True or False."
            )
        if on_write_error not in (RAISE, WARN):
            raise InvalidArgumentError(
                f"Invalid value for argument `on_write_error`. Received: on_write_error={on_write_error!r}. "
                f"Expected {RAISE!r} (stop training) or {WARN!r} (log a warning and train on)."
            )
        if not isinstance(keep_previous, bool):
            raise InvalidArgumentError(
                f"Invalid value for argument `keep_previous`. Received: keep_previous={keep_previous!r}. "
                "Expected True or False."
            )
        if resume not in (AUTO, REQUIRED):
            raise InvalidArgumentError(
                f"Invalid value for argument `resume`. Received: resume={resume!r}. Expected {AUTO!r} "
                f"(restore a backup if there is one, else start fresh) or {REQUIRED!r} (raise "
                "NoBackupError when there is none)."
            )
        if verbose not in (True, False):  # 0 and 1 too, as Keras callbacks take them
            raise InvalidArgumentError(
                f"Invalid value for argument `verbose`. Received: verbose={verbose!r}. Expected True "
                "(print a line when a backup is restored) or False (only log it)."
            )
        if not isinstance(async_backup, bool):
            raise InvalidArgumentError(
                f"Invalid value for argument `async_backup`. Received: async_backup={async_backup!r}. "
                "Expected True (write backups in a background thread) or False."
            )
        object.__setattr__(self, "backup_dir", str(backup_dir).rstrip("/") if remote else Path(backup_dir))
        object.__setattr__(self, "storage_options", dict(storage_options or {}))
        object.__setattr__(self, "staging_dir", Path(staging_dir) if staging_dir is not None else None)
        object.__setattr__(self, "save_freq", save_freq)
        object.__setattr__(self, "delete_checkpoint", delete_checkpoint)
        given: bool | tuple = save_before_preemption  # type: ignore[assignment]
        if not isinstance(save_before_preemption, bool):
            listed = isinstance(save_before_preemption, Sequence) and not isinstance(
                save_before_preemption, str
            )
            given = tuple(save_before_preemption) if listed else (save_before_preemption,)
        object.__setattr__(self, "preemption_signals", parse_signals(given))
        object.__setattr__(self, "save_before_preemption", given)
        object.__setattr__(self, "on_write_error", on_write_error)
        object.__setattr__(self, "keep_previous", keep_previous)
        object.__setattr__(self, "resume", resume)
        object.__setattr__(self, "verbose", bool(verbose))
        object.__setattr__(self, "async_backup", async_backup)

    @property
    def remote(self) -> bool:
        """Whether ``backup_dir`` is in an object store (a URL) rather than a local folder."""
        return isinstance(self.backup_dir, str)

    @property
    def per_epoch(self) -> bool:
        return self.save_freq == EPOCH

    @property
    def periodic(self) -> bool:
        """Whether backups are made as training goes (``save_freq`` is not ``False``)."""
        return self.save_freq is not False


def _check_is_a_folder(backup_dir: Path) -> None:
    """Refuse a ``backup_dir`` that is a file, lies under one, or is a dangling link, before ``fit``.

    What cannot be looked at now (no permission to search a parent) is left to ``fit``, which names it.
    """
    try:
        if backup_dir.is_symlink() and not backup_dir.exists():
            raise InvalidArgumentError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={str(backup_dir)!r}, a "
                f"symbolic link to {os.readlink(backup_dir)!r}, which does not exist (or loops). Expected "
                "a folder (existing or not) for the backup; create the link's target or choose another path."
            )
        for path in (backup_dir, *backup_dir.parents):
            if path.exists():
                break
        else:
            return
    except OSError:
        return
    if not path.is_dir():
        where = "is a file" if path == backup_dir else f"lies under {str(path)!r}, which is a file"
        raise InvalidArgumentError(
            f"Invalid value for argument `backup_dir`. Received: backup_dir={str(backup_dir)!r}, which "
            f"{where}, not a folder. Expected a folder (existing or not) for the backup; choose another "
            "path. The file is left as it is."
        )


def check_url(url: str) -> None:
    """Refuse a URL with no bucket, or one that names an object store's parent of everything."""
    protocol, _, rest = url.partition("://")
    if protocol not in REMOTE_PROTOCOLS:
        raise InvalidArgumentError(
            f"Invalid value for argument `backup_dir`. Received: backup_dir={redact(url)!r}, a "
            f"{protocol}:// URL. Expected a local folder, or an s3:// or gs:// URL: those are the stores "
            "whose conditional writes keep two trainings apart. Mount another store and pass the "
            "mounted path."
        )
    if redact(url) != url:
        raise InvalidArgumentError(
            f"Invalid value for argument `backup_dir`. Received: backup_dir={redact(url)!r} with "
            "credentials in it (user:password@). Expected a URL without them; pass credentials through "
            "the store's usual configuration or storage_options, which are never shown."
        )
    if not protocol or not rest.strip("/") or rest.startswith("/"):
        raise InvalidArgumentError(
            f"Invalid value for argument `backup_dir`. Received: backup_dir={redact(url)!r}. Expected a "
            "URL with a bucket and, usually, a prefix: 's3://bucket/prefix' or 'gs://bucket/prefix'."
        )
