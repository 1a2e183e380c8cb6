"""An owner lock on ``backup_dir``: one live training per folder.

The lock is an ``flock`` on ``.unified-backup.lock``, so the kernel drops it when its process
dies (forked children close their inherited copy, so they cannot keep it alive). The file
records the owner. It is removed when a ``fit`` finishes well, and stays when one stops early
(an exception, a preemption stop, a kill), whatever the framework: so finding the file but taking
the lock means a run on this folder did not finish. The lock is then taken over, logged at INFO
(the usual path of a resume), and :attr:`DirectoryLock.unfinished` names that run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unified_backup.errors import BackupDirInUseError, BackupWriteError, UnsupportedEnvironmentError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".unified-backup.lock"
log = logging.getLogger(__name__)

# Locks held by this process: folder or URL -> (lock or lease, ident of the thread whose fit took it).
_HELD: dict[str, tuple[Any, int]] = {}


class DirectoryLock:
    """Exclusive, non-blocking ownership of one folder by one process."""

    def __init__(self, directory: Path, before_takeover: Callable[[], None] | None = None) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.before_takeover = before_takeover  # called when a later fit of this process takes it over
        self._fd: int | None = None
        self.unfinished: str | None = None  # at acquire: the run that left the lock file, if one did
        self._found = b""  # the record in the lock file when acquired, written back by restore_mark

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`BackupDirInUseError` naming the live owner."""
        if self._fd is not None:
            return
        self.unfinished = self._take_over_from_this_process()
        if fcntl is None:  # pragma: no cover
            raise BackupDirInUseError("unified-backup's lock needs fcntl (POSIX); this platform has none.")
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a finishing training removed the emptied folder: again
                continue
            except OSError as exc:
                raise BackupWriteError(
                    exc.errno,
                    f"Cannot create the lock file {self.path} ({exc}). Expected a backup_dir "
                    "this process can write to; fix its permissions or choose another folder.",
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(_read_record(fd))
                os.close(fd)
                raise BackupDirInUseError(
                    f"{self.path.parent} is in use by another live training ({owner}). Expected a "
                    "backup_dir that no running job uses. Give each training its own backup_dir, "
                    "or stop the other job first."
                ) from None
            except OSError as exc:  # e.g. ENOLCK, EOPNOTSUPP: a filesystem without flock
                os.close(fd)
                raise UnsupportedEnvironmentError(
                    f"Cannot lock {self.path} ({exc}): the filesystem of backup_dir does not support "
                    "flock, so two trainings could not be kept apart. Expected a local or NFS folder with "
                    "locking; choose another backup_dir."
                ) from exc
            # The holder may have unlinked the file between our open and our flock: retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._found = _read_record(fd)
        previous = _owner(self._found)
        if previous != "unknown owner" and self.unfinished is None:  # a resume after a crash: no alarm
            log.info(
                "Taking over the lock on %s left by a run that did not finish (%s).",
                self.path.parent,
                previous,
            )
            self.unfinished = previous
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as exc:  # e.g. a full disk: the flock alone still excludes other trainings
            log.warning("Could not record this process as the owner of %s (%s).", self.path, exc)
        self._fd = fd
        _HELD[self._key] = (self, threading.get_ident())

    @property
    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _take_over_from_this_process(self) -> str | None:
        return take_over_from_this_process(self._key, str(self.path.parent))

    def forget(self) -> None:
        """(forked child) Close the inherited lock file without touching it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self, finished: bool = True, restore_mark: bool = False) -> None:
        """Drop the lock. With ``finished`` remove the file first (so no one locks a dead file);
        without, the file stays as the mark of a run that did not finish. ``restore_mark``: write
        back the record found at acquire (a start that was refused leaves the mark as it was)."""
        if self._fd is None:
            return
        _HELD.pop(self._key, None)
        try:
            if finished:
                self.path.unlink(missing_ok=True)
            elif restore_mark and self._found:
                with contextlib.suppress(OSError):  # the mark itself stays either way
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, self._found, 0)
        finally:
            os.close(self._fd)
            self._fd = None


def take_over_from_this_process(key: str, where: str) -> str | None:
    """Free the lock on ``key`` that an earlier ``fit`` of this thread (or of a finished thread) left held.

    A ``fit`` that raised never reaches its end hook in Keras, so its lock stays taken; the
    next ``fit`` on the same thread cannot be concurrent with it, so it takes the lock over.
    Returns who held it, in words, or None.
    """
    held = _HELD.get(key)
    if held is None:
        return None
    holder, thread_id = held
    alive = {t.ident for t in threading.enumerate()}
    if thread_id == threading.get_ident() or thread_id not in alive:
        log.info(
            "Taking over the lock on %s left by an earlier fit in this process that did not finish.", where
        )
        if holder.before_takeover is not None:  # e.g. its background write, still committing
            holder.before_takeover()
        holder.release(finished=False)  # its mark stays until this fit is accepted
        return "an earlier fit in this process"
    return None


def _drop_in_child() -> None:
    """In a forked child (e.g. a DataLoader worker), close the inherited lock files.

    An flock belongs to the open file, which a fork shares: a child that outlives a killed
    training would otherwise keep its lock, and the restart would find the folder in use.
    """
    for lock, _ in _HELD.values():
        lock.forget()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def _read_record(fd: int) -> bytes:
    try:
        return os.pread(fd, 4096, 0)
    except OSError:
        return b""


def _owner(record: bytes) -> str:
    """Who a lock file's ``record`` names, in words."""
    try:
        owner = json.loads(record or b"null")
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (ValueError, TypeError, KeyError):
        return "unknown owner"
