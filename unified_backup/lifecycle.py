"""The lifecycle of one ``fit`` against one backup slot: every ordering decision, written once.

An adapter translates its framework's hooks into four calls and supplies a :class:`TrainingState`::

    open(state, coordinator)   fit begins            lock; read and verify the backup; nothing loaded
    restore()                  model fingerprintable  check the fingerprint, settle the folder, load
    boundary(position, ...)    after a step / epoch   nothing, back up, or back up and stop
    finish(success)            fit ends               delete on success (if asked), unlock

``open`` and ``restore`` are apart because a framework may have to know where training resumes
(Keras: the first epoch) before its model exists to be fingerprinted; most adapters call both at
once. At a boundary the lifecycle decides: a backup is due (``save_freq``), or a preemption signal
reached any process (then it backs up that step, unless it holds it already, logs one line and
raises ``TrainingPreempted``), or nothing happens.

Distributed call order (orbax-style: barrier, all write, barrier, primary commits, barrier).
Every process makes every call; only the primary touches the commit record::

    open:      1. (primary) lock, read + verify        2. broadcast the choice or the error
    restore:   1. (primary) fingerprint check; promote the previous backup or remove leftovers
               2. broadcast the outcome  3. (all) state.load  4. gather failures: all go on, or all raise
               5. barrier
    boundary:  1. (all) any(preemption signal), when a watch is attached
               2. backup when due or preempted:
                  a. (primary) stage  b. broadcast the staging folder
                  c. (all) make the folder (others: scratch; sharded state: the primary's), gather
                  failures: all save, or none
                  d. (all) state.save  e. gather failures: all commit, or none
                  f. (primary) commit: manifest written last, renamed  g. broadcast the outcome
               3. when preempted: (all) watch.before_stop, gather the signals, finish, raise
                  (a backup that fails then ends the fit too: nothing stays locked or installed)
    finish:    when deleting: 1. barrier  2. (primary) delete the backup;  then (primary) unlock

``async_backup`` (one process): a due backup stages its folder and takes the state's snapshot in
the training thread, then a :class:`BackgroundWriter` writes and commits it while training goes
on. The writer is waited for (and what it raised reported, by ``on_write_error``) at the next
backup, before a preemption backup (written in the training thread) and in ``finish``, before
anything is deleted or unlocked.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from unified_backup import choice, errors, fingerprint, preemption
from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import BackupError, BackupWriteError, IncompatibleBackupError, NoBackupError
from unified_backup.manifest import Header, Manifest
from unified_backup.options import REQUIRED, WARN, BackupOptions
from unified_backup.preemption import PreemptionWatch, TrainingPreempted
from unified_backup.remote_slot import slot_for
from unified_backup.state import REPLICATED, SHARDED, Position, Snapshot, TrainingState
from unified_backup.writer import BackgroundWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BackupStats:
    """What backing up cost during one ``fit``, and what restoring cost as it began."""

    backups: int = 0  # committed
    seconds: float = 0.0  # training waited for backups (async_backup: the snapshots, and earlier writes)
    writer_seconds: float = 0.0  # the background writer spent writing and committing (async_backup)
    last_bytes: int = 0
    restore_seconds: float = 0.0  # reading, verifying, checking and loading the backup (0 if none)


@dataclasses.dataclass
class _Fit:
    """The running ``fit``: what it trains, who takes part, and what the slot holds for it."""

    state: TrainingState
    coordinator: Coordinator
    opened: Manifest | None = None
    refused: str | None = None  # why the newest backup was refused, when ``opened`` is the previous one
    watch: PreemptionWatch | None = None
    restored: bool = False  # restore() completed: the opened backup was checked and loaded
    last_backup_step: int = 0  # of the last backup tried (or where training started); due ones count from it
    committed_step: int | None = None  # of the backup the slot holds for this fit


class Lifecycle:
    """One ``fit`` at a time against one backup slot; reusable, since ``finish`` returns it to idle."""

    def __init__(
        self,
        options: BackupOptions,
        *,
        preempted: type[TrainingPreempted] = TrainingPreempted,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self._announce = announce  # shows the restore line (``verbose``) where the framework shows its own
        self.slot = slot_for(
            options.backup_dir,
            options.keep_previous,
            storage_options=options.storage_options,
            staging_dir=options.staging_dir,
        )
        self.restored: Manifest | None = None
        self.stats = BackupStats()
        self._preempted = preempted
        self._writer = BackgroundWriter()  # async_backup
        self._lock = self.slot.lock(before_takeover=self._end_background_write)
        self._fit: _Fit | None = None

    @property
    def running(self) -> bool:
        return self._fit is not None

    # -- fit begins ------------------------------------------------------------------------
    def open(self, state: TrainingState, coordinator: Coordinator | None = None) -> Manifest | None:
        """Lock ``backup_dir`` and choose the verified backup to restore (None: start fresh).

        Nothing on disk changes and nothing is loaded yet. Raises the specific
        :class:`InvalidBackupError`, or :class:`BackupDirInUseError` if another training owns the folder.
        """
        if self._fit is not None:  # left running by a fit that raised where no hook said so
            self.finish(success=False)
        if self.options.async_backup:
            _check_async(state)
        if self.options.remote and _sharded(state):
            raise errors.UnsupportedEnvironmentError(
                f"backup_dir={self.options.backup_dir!r} is in an object store, but this training's state "
                "is sharded: every process writes its own shards into one shared staging folder, which an "
                "object store does not give. Expected a replicated strategy with a remote backup_dir; "
                "or put backup_dir on a filesystem every process sees (e.g. NFS, a mounted bucket)."
            )
        began = time.perf_counter()
        self.stats, self.restored = BackupStats(), None
        fit = self._fit = _Fit(state, coordinator or SingleProcess())
        chosen = self._on_primary("Opening the backup", lambda: self._choose(state.framework), abandon=True)
        fit.opened = Manifest.from_json(chosen["manifest"]) if chosen["manifest"] else None
        fit.refused = chosen["refused"]
        self.stats.restore_seconds = time.perf_counter() - began if fit.opened else 0.0
        return fit.opened

    def restore(self) -> Manifest | None:
        """Check the opened backup against the live training, settle the folder, and load it."""
        fit = self._running("restore")
        manifest = fit.opened
        began = time.perf_counter()
        self._on_primary("Restoring the backup", lambda: self._settle(fit), abandon=True)
        if manifest is not None:
            failure: BaseException | None = None
            try:
                fit.state.load(self.slot.fetch(manifest), manifest, fit.coordinator)
            except BaseException as exc:
                failure = exc
            finally:
                self.slot.cleanup()  # a remote backup's verified download
            report = self._agree(fit, failure)  # all restore, or all stop alike
            if report is not None:
                self._abandon()
                raise _raised(report, failure, fit.coordinator.rank) from failure
            self.stats.restore_seconds += time.perf_counter() - began
            line = restore_line(manifest, self.options.backup_dir)
            log.info(line)
            if self.options.verbose and self._announce is not None and fit.coordinator.is_primary:
                try:
                    self._announce(line)
                except Exception as exc:  # a line to show must never stop training, or strand the others
                    log.warning("Could not show the restore line (%r); it is logged at INFO instead.", exc)
        fit.coordinator.barrier("unified_backup.start")
        self.restored, fit.restored = manifest, True
        fit.committed_step = manifest.global_step if manifest else None
        self.training_starts(manifest.global_step if manifest else fit.state.global_step)
        return manifest

    def start(self, state: TrainingState, coordinator: Coordinator | None = None) -> Manifest | None:
        """``open`` and ``restore`` at once, for adapters whose model exists when ``fit`` starts."""
        self.open(state, coordinator)
        return self.restore()

    def training_starts(self, global_step: int) -> None:
        """Count ``save_freq=N`` from ``global_step``; ``restore`` calls it with the restored (or live) step.

        For a framework that restores its own counters after ``restore`` (Lightning, from a
        ``fit(ckpt_path=...)``), call it again once they are restored.
        """
        self._running("training_starts").last_backup_step = global_step

    def watch(self, watch: PreemptionWatch) -> None:
        """Stop at the next boundary once the installed ``watch`` saw a signal; ``finish`` uninstalls it."""
        self._running("watch").watch = watch

    # -- during fit ------------------------------------------------------------------------
    def boundary(
        self, position: Position, *, epoch_end: bool = False, preemption: bool = True
    ) -> Manifest | None:
        """A step (or, with ``epoch_end``, an epoch) ended at ``position``: back up if due, stop if preempted.

        ``preemption=False`` where no step follows (e.g. ``max_steps`` reached): a signal is then
        reported by ``finish``. Returns the manifest committed here, or None.
        """
        fit = self._running("boundary")
        if not fit.restored:  # opened only, e.g. an unbuilt Keras model that never took a step
            return None
        preempted = preemption and fit.watch is not None and fit.watch.agreed(fit.coordinator)
        manifest = None
        try:
            if preempted:  # the preemption backup is written now, after the one in flight
                self._wait_for_writer(fit, stopping=True)
            if self._due(fit, position, epoch_end) or (
                preempted and position.global_step != fit.committed_step
            ):
                if self.options.async_backup and not preempted:
                    self._backup_in_background(fit, position)
                else:
                    manifest = self._backup(fit, position)
        except BaseException:
            if preempted:  # stopping anyway: leave nothing held
                self.finish(success=False)
            raise
        if preempted:
            self._stop(fit, position)
        return manifest

    # -- fit ends --------------------------------------------------------------------------
    def finish(self, success: bool) -> None:
        """End the ``fit``: on success delete the backup (if asked); always release the folder."""
        if self._fit is None:
            return
        failure = None  # before anything is deleted or unlocked, the background write ends
        if success:
            failure = self._writer.wait()
        else:
            self._end_background_write()
        reraise = failure is not None and _raises(failure, self.options.on_write_error)
        if reraise:  # as if the backup had failed in the training thread: fit ends with it, the backup stays
            success = False
        elif failure is not None:
            _skipped(failure, "Training finished")
        fit, self._fit = self._fit, None
        if fit.watch is not None:
            fit.watch.uninstall()
            if success and fit.watch.received is not None:
                log.warning(
                    "%s received as the training finished: no step was left to run, so fit ends normally.",
                    fit.watch.received.name,
                )
        coordinator = fit.coordinator
        delete = success and self.options.delete_checkpoint
        if delete and not fit.restored:  # e.g. an unbuilt Keras model with nothing left to train
            log.warning(
                "Kept the backup in %s: fit ended before it could be checked against the model and "
                "restored, so it is not deleted.",
                self.options.backup_dir,
            )
            delete = False
        try:
            if delete:
                coordinator.barrier("unified_backup.finish")
                if coordinator.is_primary:
                    confirm = getattr(self._lock, "confirm", None)  # a lease: is backup_dir still ours?
                    if confirm is not None:
                        confirm()
                    self.slot.delete()
        except OSError as exc:  # the manifest goes first: nothing is left committed
            log.warning(
                "Training finished, but removing the backup files in %s failed (%s).",
                self.options.backup_dir,
                exc,
            )
        except errors.BackupDirInUseError as exc:  # another job owns it now: its backup is not ours
            log.error("Training finished; the backup in %s is kept: %s", self.options.backup_dir, exc)
            delete = False
        finally:
            self._lock.release(finished=success)  # the lock file stays as the mark of a run that stopped
            self.slot.cleanup()
        if delete and coordinator.is_primary:
            self.slot.prune()
        log.info(
            "Training %s; %s backup in %s (%d backup(s), %.2f s spent backing up).",
            "finished" if success else "stopped",
            "deleted the" if delete else "kept the",
            self.options.backup_dir,
            self.stats.backups,
            self.stats.seconds,
        )
        if reraise:
            raise failure  # type: ignore[misc]

    # -- opening ------------------------------------------------------------------------
    def _choose(self, framework: str) -> dict[str, Any]:
        """(primary) Lock, then the verified manifest to restore and why the newest was refused, if it was."""
        self.slot.claim()
        self._lock.acquire()
        manifest, refused = choice.choose(self.slot, framework, keep_previous=self.options.keep_previous)
        if manifest is None:
            self._fresh_start()
        return {
            "manifest": manifest.to_json() if manifest else None,
            "refused": str(refused) if refused else None,
        }

    def _fresh_start(self) -> None:
        """(primary) Nothing to restore: raise with ``resume="required"``; else warn if this is a restart."""
        signs = restart_signs(self._lock.unfinished)
        if self.options.resume == REQUIRED:
            raise NoBackupError(
                f"resume='required', but {self.options.backup_dir} holds no backup to restore"
                + (f" ({'; '.join(signs)})" if signs else "")
                + ". Expected the backup of an earlier run of this training: check backup_dir, or pass "
                "resume='auto' to start from scratch."
            )
        if signs:
            log.warning(
                "Training starts from scratch: %s holds no backup to restore, although this looks like a "
                "restart (%s). Usually the earlier run stopped before its first backup point; or its "
                "backup was deleted, or it wrote to another backup_dir. Pass resume='required' to make "
                "this an error.",
                self.options.backup_dir,
                "; ".join(signs),
            )

    def _settle(self, fit: _Fit) -> None:
        """(primary) Refuse an incompatible backup; then promote the fallback, and remove leftovers."""
        manifest = fit.opened
        if manifest is not None:
            fingerprint.check(manifest.fingerprint, fit.state.fingerprint(), str(self.options.backup_dir))
            _check_topology(manifest, _topology(fit.state), str(self.options.backup_dir))
        choice.settle(self.slot, manifest, fit.refused, keep_previous=self.options.keep_previous)

    # -- backing up ------------------------------------------------------------------------
    def _due(self, fit: _Fit, position: Position, epoch_end: bool) -> bool:
        """Whether ``save_freq`` asks for a backup here: at an epoch end, or N optimizer steps on."""
        if not self.options.periodic:
            return False
        if self.options.per_epoch:
            return epoch_end
        return position.global_step - fit.last_backup_step >= int(self.options.save_freq)

    def _backup(self, fit: _Fit, position: Position) -> Manifest | None:
        """Commit a backup of ``position`` that replaces the old one in one atomic step.

        A failed write (disk full, I/O error, file too large, read-only folder) leaves the previous
        backup committed and intact and removes the staging area; then, by ``on_write_error``,
        raise :class:`BackupWriteError` (stop training) or log a warning, return None and go on.
        """
        began = time.perf_counter()
        fit.last_backup_step = position.global_step
        try:
            manifest = self._write(fit, position)
        except BackupWriteError as exc:
            if _raises(exc, self.options.on_write_error):
                raise
            _skipped(exc, "Training goes on")
            return None
        self._committed(fit, position, manifest)
        self.stats.seconds += time.perf_counter() - began
        return manifest

    def _committed(self, fit: _Fit, position: Position, manifest: Manifest | None) -> None:
        """Count the backup of ``position`` that was just committed (``manifest``: None off the primary)."""
        fit.committed_step = position.global_step
        self.stats.backups += 1
        if manifest is not None:
            self.stats.last_bytes = manifest.total_bytes

    def _backup_in_background(self, fit: _Fit, position: Position) -> None:
        """(one process) Wait for the write in flight, take the snapshot, and hand its write and commit
        to the background writer. A failure to stage or snapshot is handled as in :meth:`_backup`."""
        self._wait_for_writer(fit)
        began = time.perf_counter()
        fit.last_backup_step = position.global_step
        staged = None
        try:
            staged = self.slot.stage()
            write = cast(Snapshot, fit.state).snapshot(position, fit.coordinator)
            header = self._header(fit, position)
        except BaseException as exc:
            if staged is not None:
                self.slot.discard(staged)
            if not isinstance(exc, Exception):  # e.g. Ctrl-C during a large snapshot
                raise
            failure = self._write_error(exc, staged)
            if not _raises(failure, self.options.on_write_error):
                _skipped(failure, "Training goes on")
                return
            if failure is exc:
                raise
            raise failure from exc
        finally:
            self.stats.seconds += time.perf_counter() - began

        def write_and_commit() -> None:
            began = time.perf_counter()
            try:
                checksums = write(staged)
            except Exception as exc:
                self.slot.discard(staged)
                failure = self._write_error(exc, staged)
                if failure is exc:
                    raise
                raise failure from exc
            finally:
                self.stats.writer_seconds += time.perf_counter() - began
            began = time.perf_counter()
            try:
                manifest = self.slot.commit(staged, header, checksums)
            finally:
                self.stats.writer_seconds += time.perf_counter() - began
            self._committed(fit, position, manifest)

        self._writer.start(write_and_commit)

    def _wait_for_writer(self, fit: _Fit, stopping: bool = False) -> None:
        """Wait for the background write in flight; report what it raised (by ``on_write_error``).
        The wait counts in ``stats.seconds``: training waited for it."""
        if not self._writer.busy:
            return
        began = time.perf_counter()
        failure = self._writer.wait()
        self.stats.seconds += time.perf_counter() - began
        if failure is None:
            return
        if _raises(failure, self.options.on_write_error):
            raise failure
        _skipped(failure, "The preemption backup follows" if stopping else "Training goes on")

    def _end_background_write(self) -> None:
        """Before a later ``fit`` of this process takes the folder over (a Keras ``fit`` that raised ends
        no lifecycle): wait for this one's background write, so that it cannot commit over the new fit."""
        failure = self._writer.wait()
        if failure is not None:
            log.warning(
                "The backup being written in the background when training stopped failed: %s", failure
            )

    def _write_error(self, exc: Exception, staged: Path | None) -> BackupError:
        """What a failed snapshot or background write raises: a write error says the last backup is intact."""
        if isinstance(exc, OSError):  # a write error of the state's too: say that the last backup is intact
            return self._write_failure(exc.errno, staged or self.options.backup_dir, str(exc.strerror or exc))
        return _as_backup_error(exc, f"Backing up into {self.options.backup_dir} failed")

    def _write(self, fit: _Fit, position: Position) -> Manifest | None:
        coordinator = fit.coordinator
        staged = Path(self._on_primary("Creating a staging folder", self._stage))
        shared = coordinator.is_primary or _sharded(fit.state)  # shards: every process writes its own files
        target = staged if shared else staged.with_name(f"{staged.name}.worker-{coordinator.rank}")
        if self.options.remote and not shared:  # the primary's staging folder is on its own host
            target = self.slot.stage()  # a scratch folder of this process's own, removed as usual
        failure = _attempt(lambda: _make_folder(target, made=coordinator.is_primary or not shared))
        report = self._agree(fit, failure)  # every process has its folder, or none saves
        checksums: list[Mapping[str, str] | None] = [None]
        if report is None:  # save makes its collectives before any write that can fail (see TrainingState)
            failure = _attempt(
                lambda: checksums.__setitem__(0, fit.state.save(target, position, coordinator))
            )
            report = self._agree(fit, failure)  # all commit, or none does (replaces a barrier)
        if coordinator.is_primary and report is not None:
            self.slot.discard(staged)
        elif not shared:  # scratch: never committed
            shutil.rmtree(target, ignore_errors=True)
        if report is None:
            return Manifest.from_json(
                self._on_primary(
                    "Committing the backup", lambda: self._commit(fit, staged, position, checksums[0])
                )
            )
        if not report["os"]:  # not a write error: every process stops, whatever on_write_error says
            raise _raised(report, failure, coordinator.rank) from failure
        where = "" if isinstance(coordinator, SingleProcess) else f"process {report['rank']}: "
        raise self._write_failure(report["errno"], staged, where + report["message"]) from failure

    def _write_failure(self, code: int | None, staged: Path | str, message: str) -> BackupWriteError:
        """The error of a state that could not be saved into ``staged``: the last backup is intact."""
        return BackupWriteError(
            code or errno.EIO,
            f"Saving the training state into {staged} failed ({message}); the last backup in "
            f"{self.options.backup_dir} is still committed and intact. Free space or fix permissions.",
        )

    def _commit(
        self, fit: _Fit, staged: Path, position: Position, checksums: Mapping[str, str] | None
    ) -> str:
        """(primary) Commit the staged payload, with the checksums the state computed; the manifest JSON."""
        return self.slot.commit(staged, self._header(fit, position), checksums).to_json()

    def _header(self, fit: _Fit, position: Position) -> Header:
        state = fit.state
        return Header(
            state.framework, state.framework_version, position.counters, state.fingerprint(), _topology(state)
        )

    def _stage(self) -> str:
        try:
            return str(self.slot.stage())
        except OSError as exc:
            raise BackupWriteError(
                exc.errno,
                f"Cannot create a staging folder in {self.options.backup_dir} ({exc}); the last backup is "
                "still committed and intact. Free space or fix permissions on backup_dir.",
            ) from exc

    # -- stopping --------------------------------------------------------------------------
    def _stop(self, fit: _Fit, position: Position) -> None:
        """Log the one stop line, end the fit (the backup stays), and raise ``TrainingPreempted``."""
        assert fit.watch is not None
        fit.watch.before_stop()
        received = fit.coordinator.gather(fit.watch.received.name if fit.watch.received else None)
        committed = fit.committed_step == position.global_step
        message = preemption.stop_message(
            preemption.cause(received), position.counters, self.options.backup_dir, committed=committed
        )
        if fit.coordinator.is_primary:
            log.warning(message)
        try:
            fit.watch.stopping(received, fit.coordinator.is_primary, committed)
        except Exception:  # noqa: BLE001 - the backup is done; a scheduler hook must not hang the others
            log.exception("After the preemption backup, telling the scheduler failed")
        fit.coordinator.barrier("unified-backup-stopping")  # no process exits before e.g. a requeue ran
        self.finish(success=False)
        raise self._preempted(message)

    # -- helpers ---------------------------------------------------------------------------
    def _on_primary(self, what: str, call: Callable[[], Any], *, abandon: bool = False) -> Any:
        """Run ``call`` on the primary and hand its result to every process; on failure all raise.

        ``abandon``: a failure ends the fit before it trained (opening, restoring) and releases the folder.
        """
        coordinator = self._running(what).coordinator
        outcome: dict[str, Any] = {}
        failure: BackupError | None = None
        if coordinator.is_primary:
            try:
                outcome = {"value": call()}
            except Exception as exc:  # every process must hear of it, or they would wait forever
                failure = _as_backup_error(exc, f"{what} in {self.options.backup_dir} failed")
                outcome = {"error": _report(failure, coordinator.rank)}
        outcome = coordinator.broadcast(outcome)
        if "error" not in outcome:
            return outcome["value"]
        if abandon:
            self._abandon()
        raise _raised(outcome["error"], failure, coordinator.rank)

    def _agree(self, fit: _Fit, failure: BaseException | None) -> dict[str, Any] | None:
        """(all processes) The report of the first process that failed, the same on every process;
        None when none failed. Every process then raises alike (see :func:`_raised`)."""
        rank = fit.coordinator.rank
        reports = fit.coordinator.gather(None if failure is None else _report(failure, rank))
        return next((report for report in reports if report is not None), None)

    def _abandon(self) -> None:
        """A ``fit`` that could not start: release the folder and the signals; nothing on disk changed
        (the lock file stays only if an unfinished run had left one)."""
        fit, self._fit = self._fit, None
        if fit is not None and fit.watch is not None:
            fit.watch.uninstall()
        self._lock.release(finished=self._lock.unfinished is None, restore_mark=True)
        self.slot.cleanup()
        if fit is not None and fit.coordinator.is_primary:
            self.slot.prune()  # a folder made for this fit only, e.g. refused by resume="required"

    def _running(self, what: str) -> _Fit:
        if self._fit is None:
            raise BackupError(
                f"Lifecycle.{what}() was called while no fit is running; expected open() first. "
                "This is a bug in the adapter: please report it."
            )
        return self._fit


RESTART_COUNTERS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")  # set by the scheduler


def restart_signs(unfinished: str | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Why this run looks like a restart: the lock file of a run that did not finish, or a
    scheduler's restart counter above zero. Empty for a first run."""
    signs = [f"a run that did not finish left its lock file: {unfinished}"] if unfinished else []
    for name in RESTART_COUNTERS:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            signs.append(f"{name}={value}")
    return signs


def restore_line(manifest: Manifest, backup_dir: Path | str) -> str:
    """The one line shown on every restore, in every adapter."""
    return (
        f"Resumed from {backup_dir}: {manifest.epoch} epoch(s) done, step {manifest.step_in_epoch} of the "
        f"next (global step {manifest.global_step}); written {_age(manifest.created_at)} by "
        f"{manifest.framework} {manifest.framework_version}."
    )


def _age(created_at: str) -> str:
    try:
        then = datetime.datetime.fromisoformat(created_at)
    except ValueError:
        return f"at {created_at}"
    if then.tzinfo is None:  # the manifest writes UTC
        then = then.replace(tzinfo=datetime.timezone.utc)
    seconds = (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()
    if seconds < -60:  # another host's clock, well ahead of this one
        return f"at {created_at}"
    seconds = max(seconds, 0.0)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''} ago"
    return f"{int(seconds)} s ago"


_SHAPE = ("workers", "replicas")  # what splits the input and the random streams; the rest is recorded only


def _attempt(call: Callable[[], Any]) -> BaseException | None:
    """Run ``call``; what it raised, or None. Every process then agrees on the outcome."""
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def _check_async(state: TrainingState) -> None:
    """Refuse ``async_backup`` for a state that cannot take snapshots, or that runs on several processes."""
    workers = int(_topology(state).get("workers", 1))
    if workers > 1 or _sharded(state) or not callable(getattr(state, "snapshot", None)):
        why = (
            f"this training runs on {workers} processes"
            if workers > 1
            else "its state is sharded (every process writes its own shards)"
            if _sharded(state)
            else "this state takes no snapshots"
        )
        raise errors.UnsupportedEnvironmentError(
            f"async_backup=True writes backups in a background thread of one process, but {why}. Expected "
            "a training in one process; pass async_backup=False (backups are then written as training "
            "waits)."
        )


def _skipped(failure: BaseException, then: str) -> None:
    """Log a backup that failed under ``on_write_error="warn"``, and what happens next."""
    log.warning("Backup skipped: %s %s (on_write_error='warn').", failure, then)


def _raises(failure: BaseException, on_write_error: str) -> bool:
    """Whether ``failure`` stops training: any error but a write error under ``on_write_error="warn"``."""
    return not (isinstance(failure, BackupWriteError) and on_write_error == WARN)


def _topology(state: TrainingState) -> dict[str, Any]:
    """The job's shape as the state reports it (``topology``, optional: {} when it reports none)."""
    return dict(getattr(state, "topology", None) or {})


def _make_folder(target: Path, made: bool) -> None:
    """Make the folder a process saves into; or, where the primary made it (sharded state), check that
    this process sees it: a ``backup_dir`` that is not shared would get a local copy no one commits."""
    if made:
        target.mkdir(parents=True, exist_ok=True)
    elif not target.is_dir():
        raise errors.UnsupportedEnvironmentError(
            f"The staging folder {target} that the primary made is not there as this process sees it. "
            "Expected a backup_dir on a filesystem every process sees (e.g. NFS); put backup_dir on one."
        )


def _sharded(state: TrainingState) -> bool:
    """Whether every process writes its own part of the state into the one staging folder."""
    return bool(getattr(state, "sharded", False))


def _check_topology(manifest: Manifest, live: dict[str, Any], backup_dir: str) -> None:
    """Refuse a backup of another layout (``layout``: ``sharded`` or ``replicated``, the latter when
    unrecorded) than a job that records its own; warn when the backup was made by a job of another
    shape (other workers or replicas): replicated state restores as it is, sharded state is resharded
    by the state's ``load``,
    but what each worker and replica reads, and their random streams, are split another way. The
    strategy's name alone (e.g. none vs OneDevice) changes nothing."""
    made = dict(manifest.topology)
    layouts = (made.get("layout", REPLICATED), live.get("layout", REPLICATED))
    if "layout" in live and layouts[0] != layouts[1]:
        raise IncompatibleBackupError(
            f"The backup in {backup_dir} holds {layouts[0]} state (written with the {made.get('strategy')} "
            f"strategy); this job's {live.get('strategy')} strategy loads {layouts[1]} state, so nothing was "
            f"loaded. Expected a backup of the same kind of strategy: resume with the {made.get('strategy')} "
            "strategy, or delete the backup (`unified-backup delete BACKUP_DIR`) to start fresh."
        )
    if not made or not live or all(made.get(key) == live.get(key) for key in _SHAPE):
        return
    restored = (
        "The weights and optimizer state are resharded to this job's processes as they load, the counters "
        "restored as they are"
        if layouts[0] == SHARDED
        else "The weights, optimizer state and counters are the same on every replica and are restored as "
        "they are"
    )
    log.warning(
        "The backup in %s was made by a job of another shape (%s) than this one (%s). %s; not exact: how "
        "the input is split across workers and replicas, and per-worker random streams, so the resumed "
        "run may differ from an uninterrupted run of either shape.",
        backup_dir,
        _shape(made),
        _shape(live),
        restored,
    )


def _shape(topology: dict[str, Any]) -> str:
    return ", ".join(f"{key}={topology[key]}" for key in sorted(topology))


def _as_backup_error(exc: Exception, context: str) -> BackupError:
    """``exc`` itself when it is a :class:`BackupError`, else one that says what failed and why."""
    if isinstance(exc, BackupError):
        return exc
    if isinstance(exc, OSError):
        return BackupWriteError(
            exc.errno, f"{context}: {exc}. Check that backup_dir is readable and writable."
        )
    return BackupError(f"{context}: {type(exc).__name__}: {exc}")


def _report(failure: BaseException, rank: int) -> dict[str, Any]:
    """What the other processes need to raise an error of the same kind (JSON-like)."""
    strerror = failure.strerror if isinstance(failure, OSError) else None
    return {
        "class": type(failure).__name__,
        "os": isinstance(failure, OSError),
        "errno": getattr(failure, "errno", None),
        "message": strerror or str(failure),
        "rank": rank,
    }


def _raised(report: dict[str, Any], failure: BaseException | None, rank: int) -> BaseException:
    """What this process raises for ``report``: its own ``failure`` when it is the one reported, else an
    error of the reported class (a write error stays one, anything else is a ``BackupError``)."""
    if failure is not None and report["rank"] == rank:
        return failure
    cls = getattr(errors, report["class"], None)
    if cls is not None and issubclass(cls, OSError) and report["errno"] is not None:
        return cls(report["errno"], report["message"])
    if cls is not None:
        return cls(report["message"])
    if report["os"]:
        return OSError(report["errno"], report["message"])
    return BackupError(f"{report['class']} on process {report['rank']}: {report['message']}")
