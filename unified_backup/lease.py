"""The owner lock of a remote ``backup_dir``: a lease object, written only by conditional writes.

An object store has no ``flock``, so ownership is a lease: the object ``.unified-backup.lock``
records the owner and when its lease ends. It is

- **taken** by a write that succeeds only if the object does not exist (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``): of two jobs starting together, exactly one creates it;
- **renewed** every :data:`RENEW_SECONDS` by a write that succeeds only if the object is still the
  version this job wrote (S3 ``If-Match``, GCS ``ifGenerationMatch=N``); and once more just before
  each commit, so a job that lost its lease never commits over the new owner's backup;
- **released** when ``fit`` ends: deleted when it finished well, else marked ``stopped`` (the mark of
  a run that did not finish, as the local lock file is).

A job that finds a lease someone else holds takes it over (with the same conditional write on the
version it found) when the lease is marked stopped; when its owner ran on this host and its process
is gone; when it expired :data:`LEASE_SECONDS` ago by this host's clock (so clocks may disagree by up
to that much); or when the job watched it for :data:`LEASE_SECONDS` by its own monotonic clock and saw
no renewal. A renewal seen while watching proves a live owner: :class:`BackupDirInUseError`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unified_backup import lock
from unified_backup.errors import BackupDirInUseError, UnsupportedEnvironmentError
from unified_backup.store import ObjectStore, PreconditionFailed, Versioned

LEASE_NAME = lock.LOCK_NAME
LEASE_SECONDS = 30.0  # a lease not renewed for this long is taken over
RENEW_SECONDS = 10.0  # how often the owner renews it
_POLL_SECONDS = 1.0  # how often a starting job looks at a live lease
log = logging.getLogger(__name__)


class Lease:
    """Ownership of one remote ``backup_dir`` by one process (the remote twin of :class:`DirectoryLock`)."""

    def __init__(self, store: ObjectStore, before_takeover: Callable[[], None] | None = None) -> None:
        self.store = store
        self.before_takeover = before_takeover  # called when a later fit of this process takes it over
        self.unfinished: str | None = None  # at acquire: the run that left the lease, if one did
        self._version: str | None = None  # of the lease object this process wrote last
        self._found: Versioned | None = None  # the lease taken over, written back by restore_mark
        self._lost: str | None = None  # who took the lease over while this process held it
        self._token = secrets.token_hex(8)  # tells this job's lease from another's, whatever its version
        self.stale_takeover = False  # taken from an owner only presumed gone (expired, or not renewed)
        self._guard = threading.Lock()  # one conditional write at a time: renewer or commit
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # e.g. Lightning's ddp_spawn pickles the callback
        state = dict(self.__dict__, _version=None, _renewer=None)
        del state["_guard"], state["_stop"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _guard=threading.Lock(), _stop=threading.Event())

    @property
    def held(self) -> bool:
        return self._version is not None

    @property
    def _key(self) -> str:
        return self.store.url

    # -- taking it -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, or raise :class:`BackupDirInUseError` naming the live owner."""
        if self.held:
            return
        self.unfinished = lock.take_over_from_this_process(self._key, self.store.show())
        self._lost, self._found, self.stale_takeover = None, None, False
        self._token = secrets.token_hex(
            8
        )  # this acquire's: a lease an earlier fit left is judged as any other
        while True:
            try:
                version = self.store.create(LEASE_NAME, self._record())
                break
            except PreconditionFailed:
                pass
            found = self.store.read_versioned(LEASE_NAME)
            if found is None:  # released in between: try again
                continue
            if self._ours(found):  # our create landed and only its answer was lost
                version = found.version
                break
            found = self._judge(found)
            try:
                version = self.store.replace(LEASE_NAME, self._record(), found.version)
            except PreconditionFailed:  # another job took it first: judge its lease
                continue
            self._found = found
            break
        self._check_exclusive()
        self._version = version
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_until_released, name="unified-backup-lease", daemon=True
        )
        self._renewer.start()
        lock._HELD[self._key] = (self, threading.get_ident())

    def _judge(self, found: Versioned) -> Versioned:
        """The lease ``found`` (or what it became) once it may be taken over; raise if its owner lives."""
        record = _parse(found.data)
        owner = _owner(record)
        left = (
            "its run did not finish"
            if record.get("stopped")
            else "its owner ran on this host and its process is gone"
            if _gone_from_this_host(record)
            else None
        )
        if left is not None:  # a restart: no alarm
            log.info("Taking over the lease on %s (%s): %s.", self.store.show(), owner, left)
            self.unfinished = self.unfinished or owner
            return found
        expires = record.get("expires")
        if isinstance(expires, (int, float)) and time.time() > expires + LEASE_SECONDS:
            return self._expired(found, owner, f"it expired at {_utc(expires)}")
        log.info(
            "%s is leased by %s; watching the lease for up to %.0f s to see whether its owner is alive.",
            self.store.show(),
            owner,
            LEASE_SECONDS,
        )
        deadline = time.monotonic() + LEASE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
            now = self.store.read_versioned(LEASE_NAME)
            if now is None:
                return found  # released: the conditional write on ``found`` fails, and the loop creates it
            if now.version != found.version:
                if _parse(now.data).get("stopped"):
                    return self._judge(now)
                raise BackupDirInUseError(
                    f"{self.store.show()} is in use by another live training ({_owner(_parse(now.data))}), "
                    "which renewed its lease while this one waited. Expected a backup_dir that no running "
                    "job uses. Give each training its own backup_dir, or stop the other job first."
                )
        return self._expired(found, owner, f"it was not renewed for {LEASE_SECONDS:.0f} s")

    def _check_exclusive(self) -> None:
        """Refuse a store that ignores the conditions (some S3-compatible servers do): a second
        create of the lease, and a write on a version it never had, must both fail, or two jobs could
        both own ``backup_dir``. Any failure here leaves no lease of ours behind."""
        try:
            for write in (
                lambda: self.store.create(LEASE_NAME, self._record()),
                lambda: self.store.replace(LEASE_NAME, self._record(), self.store.conditional.never),
            ):
                try:
                    write()
                except PreconditionFailed:
                    continue
                raise UnsupportedEnvironmentError("")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.store.remove([LEASE_NAME])
            if not isinstance(exc, UnsupportedEnvironmentError) or str(exc):
                raise
        else:
            return
        raise UnsupportedEnvironmentError(
            f"{self.store.show()} ignores conditional writes (a create-only write replaced an existing "
            "object), so two trainings on it could not be kept apart. Expected S3 or GCS, or a "
            "compatible store that honours If-None-Match / ifGenerationMatch; or mount the store and "
            "pass the mounted path."
        )

    def _ours(self, found: Versioned) -> bool:
        return _parse(found.data).get("token") == self._token

    def _expired(self, found: Versioned, owner: str, why: str) -> Versioned:
        log.warning(
            "Taking over the lease on %s held by %s: %s, so its owner is taken to be gone. (A lease is "
            "renewed every %.0f s; clocks of the hosts sharing a backup_dir must agree within %.0f s.)",
            self.store.show(),
            owner,
            why,
            RENEW_SECONDS,
            LEASE_SECONDS,
        )
        self.unfinished = self.unfinished or owner
        self.stale_takeover = True
        return found

    # -- holding it ----------------------------------------------------------------------------
    def confirm(self) -> None:
        """Renew the lease now, proving this process still owns ``backup_dir``; called before each
        commit. Raises :class:`BackupDirInUseError` if another job took it over."""
        if self._lost is None and self.held:
            self._renew()
        if self._lost is not None:
            raise BackupDirInUseError(
                f"This training no longer owns {self.store.show()}: its lease was taken over by "
                f"{self._lost}, so it stops rather than commit over that job's backup. Expected the lease "
                f"renewed every {RENEW_SECONDS:.0f} s; it was not renewed for {LEASE_SECONDS:.0f} s (a "
                "stalled process or an unreachable store). Give each training its own backup_dir."
            )

    def _renew(self) -> None:
        with self._guard:
            if self._version is None or self._lost is not None:
                return
            try:
                self._version = self.store.replace(LEASE_NAME, self._record(), self._version)
            except PreconditionFailed:
                now = self.store.read_versioned(LEASE_NAME)
                if now is not None and self._ours(now):  # our renewal landed, its answer was lost
                    self._version = now.version
                    return
                self._lost = _owner(_parse(now.data)) if now is not None else "a job that then released it"
                log.error("The lease on %s was taken over by %s.", self.store.show(), self._lost)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - the store may be down for a while: try again
                log.warning("Could not renew the lease on %s (%s); trying again.", self.store.show(), exc)
            if self._lost is not None:
                return

    # -- letting it go -------------------------------------------------------------------------
    def release(self, finished: bool = True, restore_mark: bool = False) -> None:
        """Give the lease up: delete it when ``fit`` finished well; else mark it ``stopped`` (the mark of a
        run that did not finish). ``restore_mark``: write back the lease found at acquire (a start
        that was refused leaves it as it was). Never raises: a lease left behind expires."""
        if not self.held:
            return
        lock._HELD.pop(self._key, None)
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        with self._guard:
            version, self._version = self._version, None
            if self._lost is not None or version is None:
                return
            try:
                if restore_mark and self._found is not None:
                    self.store.replace(LEASE_NAME, self._found.data, version)
                elif finished or restore_mark:
                    self.store.delete(LEASE_NAME, version)
                else:
                    self.store.replace(LEASE_NAME, self._record(stopped=True), version)
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning(
                    "Could not release the lease on %s (%s); it expires within %.0f s.",
                    self.store.show(),
                    exc,
                    LEASE_SECONDS,
                )

    def forget(self) -> None:
        """(forked child) Drop the parent's lease without touching the store: the parent still holds it."""
        self._version = None
        self._guard, self._stop = threading.Lock(), threading.Event()

    def _record(self, stopped: bool = False) -> bytes:
        now = time.time()
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot": _boot_id(),
            "pidns": pid_namespace(),
            "token": self._token,
            "since": _utc(now),
            "expires": 0 if stopped else now + LEASE_SECONDS,
        }
        if stopped:
            record["stopped"] = True
        return json.dumps(record).encode()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _owner(record: dict[str, Any]) -> str:
    if "pid" not in record or "host" not in record:
        return "unknown owner"
    return f"pid {record['pid']} on {record['host']}, since {record.get('since', '?')}"


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace (its inode; "" where unknown): a pid means the same only within it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs in this PID namespace (a killed one its parent has not reaped
    counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _gone_from_this_host(record: dict[str, Any]) -> bool:
    """Whether the lease's owner ran on this host, in this boot and PID namespace (so that its pid means
    the same here), and its process no longer runs."""
    if not record.get("pidns") or record.get("pidns") != pid_namespace():
        return False
    pid = record.get("pid")
    if (
        record.get("host") != socket.gethostname()
        or not record.get("boot")
        or record.get("boot") != _boot_id()
    ):
        return False
    return isinstance(pid, int) and pid != os.getpid() and process_gone(pid)
