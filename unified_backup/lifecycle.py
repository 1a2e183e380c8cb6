"""The lifecycle that both adapters drive: restore at start, back up, delete on success.

Adapters map framework hooks to three calls and supply a :class:`TrainingState`::

    start(state)             fit begins      lock, clean leftovers, verify, check fingerprint, load
    backup(state, counters)  a backup point  stage, save, commit (atomic), drop the old backup
    finish(success)          fit ends        delete on success (if asked), release the lock

Distributed call order (orbax-style: barrier, all write, barrier, primary commits, barrier):
    start:  (primary) lock + read + verify -> broadcast outcome -> (all) load -> any(failed) -> barrier
    backup: (primary) stage -> broadcast path -> (all) save -> any(failed) -> (primary) commit
            -> broadcast outcome
    finish: [barrier -> (primary) delete, when deleting] -> (primary) unlock

NOTE: every process calls every method; only the primary touches ``backup_dir``'s commit record.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from unified_backup import errors, fingerprint
from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import (
    BackupError,
    BackupWriteError,
    CorruptBackupError,
    IncompatibleBackupError,
    InvalidBackupError,
    UnsupportedFormatError,
)
from unified_backup.lock import DirectoryLock
from unified_backup.manifest import Counters, Manifest
from unified_backup.options import WARN, BackupOptions
from unified_backup.slot import Slot

log = logging.getLogger(__name__)


class TrainingState(Protocol):
    """What an adapter knows about its framework: how to describe, save and load the training."""

    framework: str
    framework_version: str

    def fingerprint(self) -> Mapping[str, str]:
        """``{variable name: "dtype[shape]"}`` for model and optimizer (see :mod:`fingerprint`)."""

    def save(self, directory: Path) -> None:
        """Write the whole training state into the empty ``directory``."""

    def load(self, directory: Path, manifest: Manifest) -> None:
        """Restore the training state from a verified backup."""


class Phase(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"


@dataclasses.dataclass
class BackupStats:
    """What backing up cost during one ``fit``."""

    backups: int = 0
    seconds: float = 0.0
    last_bytes: int = 0


class Lifecycle:
    """One ``fit``'s use of one backup slot. Reusable: ``finish`` returns it to idle."""

    def __init__(
        self,
        options: BackupOptions,
        coordinator: Coordinator | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.slot = Slot(options.backup_dir, keep_previous=options.keep_previous)
        self.coordinator: Coordinator = coordinator or SingleProcess()
        self.phase = Phase.IDLE
        self.restored: Manifest | None = None
        self.stats = BackupStats()
        self._lock = DirectoryLock(options.backup_dir)
        self._on_phase = on_phase or (lambda name: None)
        self._peeked: tuple | None = None  # (records key, manifest, refused) chosen by peek()

    def start(self, state: TrainingState) -> Manifest | None:
        """Restore the committed backup, if any, into ``state``; return its manifest.

        Raises the specific :class:`InvalidBackupError` before anything is loaded, and
        :class:`BackupDirInUseError` if another training owns the folder.
        """
        if self.phase is Phase.RUNNING:
            self.finish(success=False)
        coordinator = self.coordinator
        self.stats = BackupStats()
        outcome: dict = {}
        failure: BaseException | None = None
        if coordinator.is_primary:
            try:
                outcome = {"manifest": self._open(state)}
            except Exception as exc:  # every process must hear of it, or they would wait forever
                self._lock.release()
                failure = _as_backup_error(exc, f"Opening the backup in {self.options.backup_dir} failed")
                outcome = {"error": type(failure).__name__, "message": str(failure)}
        outcome = coordinator.broadcast(outcome)
        if "error" in outcome:
            raise failure or getattr(errors, outcome["error"], BackupError)(outcome["message"])
        manifest = Manifest.from_json(outcome["manifest"]) if outcome["manifest"] else None
        if manifest is not None:
            self._on_phase("restore")
            try:
                state.load(self.slot.payload_dir(manifest), manifest)
            except BaseException as exc:
                failure = exc
            if coordinator.any(failure is not None):  # all restore, or all stop
                self._lock.release()
                raise failure or BackupError(
                    f"Another process failed to restore the backup in {self.options.backup_dir}; "
                    "its log names the cause. Nothing else was changed."
                )
            log.info(
                "Restored the backup in %s: %d epoch(s) done, step %d of the next, global step %d.",
                self.options.backup_dir,
                manifest.epoch,
                manifest.step_in_epoch,
                manifest.global_step,
            )
        coordinator.barrier("unified_backup.start")
        self.restored = manifest
        self.phase = Phase.RUNNING
        return manifest

    def peek(self, framework: str) -> Manifest | None:
        """(single process) Lock and verify now; return the manifest that ``start`` will restore.

        For an adapter that must set up ``fit`` (e.g. its first epoch) before the model can be
        fingerprinted. Nothing on disk changes here; ``start`` reuses the verified choice while the
        records are unchanged, so the backup is read and hashed once.
        """
        if not isinstance(self.coordinator, SingleProcess):
            raise BackupError("Lifecycle.peek() serves single-process adapters; this bug is the adapter's.")
        try:
            self._lock.acquire()
            self._peeked = (self.slot.records_key(), *self._select(framework))
        except BackupError:
            self._lock.release()
            raise
        except Exception as exc:  # e.g. a PermissionError while hashing: say which backup, and why
            self._lock.release()
            raise _as_backup_error(exc, f"Opening the backup in {self.options.backup_dir} failed") from exc
        return self._peeked[1]

    def _open(self, state: TrainingState) -> str | None:
        """(primary) Lock, validate, then settle (fallback, clean-up); return the manifest's JSON."""
        self._lock.acquire()
        peeked, self._peeked = self._peeked, None
        if peeked is not None and peeked[0] == self.slot.records_key():
            manifest, refused = peeked[1:]
        else:
            manifest, refused = self._select(state.framework)
        if manifest is not None:
            fingerprint.check(manifest.fingerprint, state.fingerprint(), str(self.options.backup_dir))
        if refused is not None:
            log.warning(
                "keep_previous=True: restoring the previous backup in %s (%d epoch(s) done, step %d of the "
                "next, global step %d), because the newest one is refused and will be removed: %s",
                self.options.backup_dir,
                manifest.epoch,
                manifest.step_in_epoch,
                manifest.global_step,
                refused,
            )
            self.slot.promote_previous()
        self.slot.remove_leftovers(manifest, self._kept_previous(manifest))
        return None if manifest is None else manifest.to_json()

    def _select(self, framework: str) -> tuple[Manifest | None, CorruptBackupError | None]:
        """The verified backup to restore, and (when it is the previous one) why the newest was refused.

        Reads and verifies only: nothing on disk changes until the choice is also compatible.
        """
        try:
            manifest = self.slot.read_manifest()
            if manifest is not None:
                self._check_framework(manifest, framework)
                self.slot.verify(manifest)
            return manifest, None
        except CorruptBackupError as refused:
            if not self.options.keep_previous:
                raise
            return self._previous_instead(refused, framework), refused

    def _previous_instead(self, refused: CorruptBackupError, framework: str) -> Manifest:
        """The previous backup, verified; else raise ``refused`` (saying why the previous one fails too)."""
        try:
            previous = self.slot.read_previous()
            if previous is not None:
                self._check_framework(previous, framework)
                self.slot.verify(previous, record=self.slot.previous_path)
        except InvalidBackupError as also:
            raise CorruptBackupError(
                f"{refused} The previous backup (keep_previous=True) is refused too: {also}"
            ) from refused
        if previous is None:  # none kept yet: the first backup of a training has no previous one
            raise refused
        return previous

    def _kept_previous(self, manifest: Manifest | None) -> Manifest | None:
        """The previous backup's manifest when it is to be kept, else None (its files are removed)."""
        if not self.options.keep_previous or manifest is None:
            return None
        try:
            return self.slot.read_previous()
        except (CorruptBackupError, UnsupportedFormatError) as exc:
            log.warning("Dropping the unreadable previous backup in %s: %s", self.options.backup_dir, exc)
            return None

    def _check_framework(self, manifest: Manifest, framework: str) -> None:
        if manifest.framework != framework:
            raise IncompatibleBackupError(
                f"The backup in {self.options.backup_dir} was written by {manifest.framework} "
                f"{manifest.framework_version}; this training runs {framework}. Nothing was loaded. "
                "Use a separate backup_dir for each framework, or delete this backup to start fresh."
            )

    def backup(self, state: TrainingState, counters: Counters) -> Manifest | None:
        """Commit a new backup of ``state`` that replaces the old one in one atomic step.

        A failed write (disk full, I/O error, file too large, read-only folder) leaves the previous
        backup committed and intact and removes the staging area; then, by ``on_write_error``,
        raise :class:`BackupWriteError` (stop training) or log a warning, return None and go on.
        """
        self._require_running("backup")
        began = time.perf_counter()
        try:
            manifest = self._write(state, counters)
        except BackupWriteError as exc:
            if self.options.on_write_error != WARN:
                raise
            log.warning("Backup skipped: %s Training goes on (on_write_error='warn').", exc)
            return None
        self._on_phase("committed")
        self.stats.backups += 1
        self.stats.seconds += time.perf_counter() - began
        return manifest

    def _write(self, state: TrainingState, counters: Counters) -> Manifest | None:
        coordinator = self.coordinator
        staged_path: dict = {}
        if coordinator.is_primary:
            try:
                staged_path = {"path": str(self.slot.stage())}
            except OSError as exc:
                staged_path = {"errno": exc.errno, "error": str(exc)}
        staged_path = coordinator.broadcast(staged_path)
        if "error" in staged_path:
            raise BackupWriteError(
                staged_path["errno"],
                f"Cannot create a staging folder in {self.options.backup_dir} ({staged_path['error']}); "
                "the last backup is still committed and intact. Free space or fix permissions on "
                "backup_dir.",
            )
        staged = Path(staged_path["path"])
        target = staged
        if not coordinator.is_primary:
            target = staged.with_name(f"{staged.name}.worker-{coordinator.rank}")
        self._on_phase("save")
        failure: BaseException | None = None
        try:
            target.mkdir(parents=True, exist_ok=True)
            state.save(target)
        except BaseException as exc:
            failure = exc
            self.slot.discard(target)
        if coordinator.any(failure is not None):  # all commit, or none does (replaces a barrier)
            if coordinator.is_primary and failure is None:
                self.slot.discard(staged)
            if failure is not None and not isinstance(failure, OSError):
                raise failure
            raise BackupWriteError(
                getattr(failure, "errno", None) or errno.EIO,
                f"Saving the training state into {target} failed "
                f"({failure if failure is not None else 'on another process; its log names the cause'}); "
                f"the last backup in {self.options.backup_dir} is still committed and intact. "
                "Free space or fix permissions.",
            ) from failure
        manifest = None
        outcome: dict = {}
        if coordinator.is_primary:
            self._on_phase("commit")
            try:
                manifest = self.slot.commit(
                    staged,
                    {
                        "framework": state.framework,
                        "framework_version": state.framework_version,
                        "epoch": counters.epoch,
                        "step_in_epoch": counters.step_in_epoch,
                        "global_step": counters.global_step,
                        "fingerprint": dict(state.fingerprint()),
                    },
                )
                self.stats.last_bytes = manifest.total_bytes
            except BackupWriteError as exc:
                outcome = {"errno": exc.errno, "message": str(exc)}
        else:
            shutil.rmtree(target, ignore_errors=True)
        outcome = coordinator.broadcast(outcome)  # replaces the "committed" barrier
        if outcome:
            raise BackupWriteError(outcome["errno"], outcome["message"])
        return manifest

    def finish(self, success: bool) -> None:
        """End the ``fit``: on success delete the backup (if asked); always release the folder."""
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.IDLE
        delete = success and self.options.delete_checkpoint
        try:
            if delete:
                self.coordinator.barrier("unified_backup.finish")
                if self.coordinator.is_primary:
                    self.slot.delete()
        except OSError as exc:  # the manifest goes first: nothing is left committed
            log.warning(
                "Training finished, but removing the backup files in %s failed (%s).",
                self.options.backup_dir,
                exc,
            )
        finally:
            self._lock.release()
        if delete and self.coordinator.is_primary:
            self.slot.prune()
        log.info(
            "Training %s; %s backup in %s (%d backup(s), %.2f s spent backing up).",
            "finished" if success else "stopped",
            "deleted the" if delete else "kept the",
            self.options.backup_dir,
            self.stats.backups,
            self.stats.seconds,
        )

    def _require_running(self, what: str) -> None:
        if self.phase is not Phase.RUNNING:
            raise errors.BackupError(
                f"{what}() was called while the lifecycle is {self.phase.value}; expected start() first. "
                "This is a bug in the adapter: please report it."
            )


def _as_backup_error(exc: Exception, context: str) -> BackupError:
    """``exc`` itself when it is a :class:`BackupError`, else one that says what failed and why."""
    if isinstance(exc, BackupError):
        return exc
    if isinstance(exc, OSError):
        return BackupWriteError(
            exc.errno, f"{context}: {exc}. Check that backup_dir is readable and writable."
        )
    return BackupError(f"{context}: {type(exc).__name__}: {exc}")
