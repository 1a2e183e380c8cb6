"""The backup slot in ``backup_dir``, with an atomic and durable commit.

Layout (every name here is the library's; anything else in the folder is the user's)::

    backup_dir/
        manifest.json            the commit record: names the payload folder, sizes, checksums
        manifest.previous.json   with keep_previous=True: the record of the backup before it
        payload-<id>/            files of a committed backup, written by an adapter
        payload-<id>/            a staging area while a new backup is written (named by no manifest)
        manifest.json.tmp-<id>   a manifest being written
        .unified-backup.lock     the owner lock (see lock.py)

Commit order (:meth:`Slot.commit`):
    1. the adapter has written the payload into a fresh ``payload-<id>/`` (:meth:`Slot.stage`);
    2. every payload file is read once to checksum it (unless the adapter checksummed it while
       writing it: :mod:`unified_backup.hashing`), and fsynced; its folders are fsynced;
    3. the manifest is written to a temporary file and fsynced;
    3b. with ``keep_previous``, the committed manifest's bytes become ``manifest.previous.json``
        (temporary file, fsync, rename, fsync of ``backup_dir``);
    4. ``os.replace`` renames the new manifest to ``manifest.json``: the one atomic step that commits;
    5. ``backup_dir`` is fsynced, then the payload folder that no manifest names any more is removed.
A crash before 4 leaves the old backup committed and a staging area that :meth:`remove_leftovers`
deletes at the next start; a crash after 4 leaves the new one committed. A crash between 3b and 4
leaves both records naming the old backup, which is still a valid pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from unified_backup.errors import BackupError, BackupWriteError, CorruptBackupError, UnsupportedFormatError
from unified_backup.lock import DirectoryLock
from unified_backup.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT,
    MANIFEST_NAME,
    PREVIOUS_NAME,
    FileEntry,
    Header,
    Manifest,
)

PAYLOAD_PREFIX = "payload-"
_PAYLOAD_NAME = re.compile(r"payload-\d{8}T\d{6}-[0-9a-f]{8}(\.worker-\d+)?")
_TMP_MARK = ".tmp-"
_FORMAT_FIELD = json.dumps({"format": FORMAT})[1:-1].encode()  # as Manifest.to_json writes it
CREATED_NAME = ".unified-backup-created"  # marks a backup_dir the library made (and may remove)
_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class Slot:
    """One folder that holds one committed backup, and with ``keep_previous`` the one before it."""

    remote = False

    def __init__(self, directory: str | os.PathLike[str], keep_previous: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_previous = keep_previous
        self.manifest_path = self.directory / MANIFEST_NAME
        self.previous_path = self.directory / PREVIOUS_NAME

    def __repr__(self) -> str:
        return f"Slot({str(self.directory)!r})"

    # -- reading ---------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        """The committed backup's manifest, or None when nothing is committed."""
        return _read(self.manifest_path)

    def read_previous(self) -> Manifest | None:
        """The previous backup's manifest (kept by ``keep_previous=True``), or None."""
        return _read(self.previous_path)

    def payload_dir(self, manifest: Manifest) -> Path:
        return self.directory / manifest.payload

    def fetch(self, manifest: Manifest) -> Path:
        """The folder ``load`` reads: the payload itself (verified when the backup was opened)."""
        return self.payload_dir(manifest)

    def lock(self, before_takeover: Callable[[], None] | None = None) -> DirectoryLock:
        """The lock that keeps other trainings off this folder."""
        return DirectoryLock(self.directory, before_takeover)

    def cleanup(self) -> None:
        """Nothing to clean: a local slot stages inside ``backup_dir`` itself."""

    def verify(self, manifest: Manifest, record: Path | str | None = None) -> None:
        """Check every payload file against the manifest (read from ``record``, default ``manifest.json``).

        Raises :class:`CorruptBackupError` naming the first file that differs, is missing or is extra,
        and :class:`UnsupportedFormatError` for a checksum algorithm this version does not know.
        """
        record = record or self.manifest_path
        if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise UnsupportedFormatError(
                f"{record} uses checksum {manifest.checksum_algorithm!r}; this version "
                f"verifies {CHECKSUM_ALGORITHM!r}. Upgrade unified-backup to restore it."
            )
        payload = self.payload_dir(manifest)
        if _PAYLOAD_NAME.fullmatch(manifest.payload) is None or not payload.is_dir():
            raise CorruptBackupError(
                f"{record} names payload folder {manifest.payload!r}, which does not exist "
                f"in {self.directory}. The backup is incomplete; delete it (`unified-backup delete "
                "BACKUP_DIR`) to start fresh."
            )
        found = relative_files(payload)
        for name in sorted(found - manifest.files.keys()):
            raise CorruptBackupError(
                f"{payload / name} is not listed in the manifest: expected only the files the backup "
                "committed. Remove that file, or delete the backup (`unified-backup delete "
                "BACKUP_DIR`) to start fresh."
            )
        for name, entry in sorted(manifest.files.items()):
            path = payload / name
            if name not in found:
                raise CorruptBackupError(
                    f"{path} is missing: the manifest lists it with {entry.bytes} bytes. The backup is "
                    "incomplete; delete it (`unified-backup delete BACKUP_DIR`) to start fresh."
                )
            size = path.stat().st_size
            if size != entry.bytes:
                raise CorruptBackupError(
                    f"{path} has {size} bytes; the manifest expects {entry.bytes} (truncated or "
                    "overwritten). Nothing was loaded; delete the backup (`unified-backup delete "
                    "BACKUP_DIR`) to start fresh."
                )
            digest = checksum_file(path, sync=False)
            if digest != entry.checksum:
                raise CorruptBackupError(
                    f"{path} fails its {CHECKSUM_ALGORITHM} check: expected {entry.checksum}, computed "
                    f"{digest}. The file was altered after the commit; nothing was loaded. Delete the "
                    "backup (`unified-backup delete BACKUP_DIR`) to start fresh."
                )

    # -- writing ---------------------------------------------------------------------------
    def stage(self) -> Path:
        """Create and return a fresh, empty payload folder for the next backup."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{PAYLOAD_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def commit(self, staged: Path, header: Header, checksums: Mapping[str, str] | None = None) -> Manifest:
        """Make ``staged`` the committed backup, atomically and durably (see the module docstring).

        ``checksums``: of payload files (relative names) computed as they were written; those are
        only made durable, not read again.
        """
        known = dict(checksums or {})
        unknown = sorted(set(known) - relative_files(staged))
        if unknown:
            raise BackupError(
                f"The training state reported checksums of {', '.join(unknown)}, which it did not write into "
                f"{staged}. This is a bug in the adapter: please report it."
            )
        try:
            files = {}
            for name in sorted(relative_files(staged)):
                path = staged / name
                if name in known:
                    fsync_path(path)
                digest = known[name] if name in known else checksum_file(path, sync=True)
                files[name] = FileEntry(path.stat().st_size, digest)
            for folder, _, _ in os.walk(staged):
                fsync_path(Path(folder))
            fsync_path(self.directory)  # the staging folder's own entry
            manifest = Manifest.commit_record(header, files, staged.name)
            committed, committed_text = self._committed()
            older = self._previous_payload()
            tmp = self._write_tmp(manifest.to_json())
            if self.keep_previous and committed is not None:
                os.replace(self._write_tmp(committed_text), self.previous_path)
                fsync_path(self.directory)  # the previous record is durable before the commit
            elif self.previous_path.exists() and is_our_record(self.previous_path):
                self.previous_path.unlink()  # a previous record must never name a removed payload
                fsync_path(self.directory)
            os.replace(tmp, self.manifest_path)  # the commit
        except OSError as exc:
            self.discard(staged)
            raise BackupWriteError(
                exc.errno,
                f"Writing the backup into {self.directory} failed ({exc}); the last "
                "backup is still committed and intact. Free space or fix permissions on backup_dir.",
            ) from exc
        kept = {staged.name, committed if self.keep_previous else None}
        unnamed = {name for name in (committed, older) if name is not None and name not in kept}
        try:
            fsync_path(self.directory)
            for name in sorted(unnamed):
                if _PAYLOAD_NAME.fullmatch(name):  # only folders this library made are ever removed
                    shutil.rmtree(self.directory / name)
        except OSError as exc:  # committed already: never undo it; the next start cleans up
            log.warning(
                "The backup in %s is committed, but finishing the commit failed (%s).", self.directory, exc
            )
        return manifest

    def discard(self, staged: Path) -> None:
        """Remove a staging area that will not be committed."""
        shutil.rmtree(staged, ignore_errors=True)
        for tmp in self.directory.glob(f"{MANIFEST_NAME}{_TMP_MARK}*"):
            tmp.unlink(missing_ok=True)

    def promote_previous(self) -> None:
        """Make the previous backup the committed one (the newest was refused); one atomic rename."""
        os.replace(self.previous_path, self.manifest_path)
        fsync_path(self.directory)

    def remove_leftovers(self, manifest: Manifest | None, previous: Manifest | None = None) -> list[Path]:
        """Delete what neither ``manifest`` (the committed one) nor ``previous`` names.

        That is staging areas, temporary manifests, and a previous backup that is not to be kept
        (``previous`` None). Call it only with manifests that were read successfully (or None when
        none exists), so that a damaged manifest never gets its payload deleted. Leftovers are
        never restored.
        """
        if not self.directory.is_dir():
            return []
        keep = {m.payload for m in (manifest, previous) if m is not None}
        removed = []
        if previous is None and self.previous_path.exists():  # the record first: never one without files
            if not is_our_record(self.previous_path):
                raise UnsupportedFormatError(
                    f"{self.previous_path} is not a unified-backup manifest: the library keeps the "
                    "previous backup's record under that name, and will not delete a file it did not "
                    "write. Move that file out of backup_dir; it should hold only the library's files."
                )
            self.previous_path.unlink()
            fsync_path(self.directory)
            removed.append(self.previous_path)
        for entry in self.directory.iterdir():
            staged = is_payload(entry) and entry.name not in keep
            if staged or entry.name.startswith(MANIFEST_NAME + _TMP_MARK):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
        if removed:  # what a kill inside a write leaves: the usual path of a resume, not an alarm
            log.info(
                "Removed %d leftover(s) in %s (incomplete backups, temporary files, or a previous backup "
                "no longer kept): %s",
                len(removed),
                self.directory,
                ", ".join(p.name for p in removed),
            )
        return removed

    def delete(self) -> list[str]:
        """Remove the committed backup and every file the library wrote; keep the user's files.

        Returns the names removed. The previous record goes first, then the manifest, so an
        interrupted delete leaves either the newest backup or no backup behind, never only an older
        one. A record that is not the library's (see :func:`is_our_record`) stays, with a warning.
        """
        if not self.directory.is_dir():
            return []
        removed = []
        for record in (self.previous_path, self.manifest_path):
            if not record.is_file():
                continue
            if not is_our_record(record):
                log.warning(
                    "Left %s in place: it is not a manifest unified-backup wrote (another format, or "
                    "damaged beyond recognition with no backup files beside it), so it is not the "
                    "library's to delete. Move it out of %s, or delete it yourself if it was a backup's.",
                    record,
                    self.directory,
                )
                continue
            record.unlink()
            removed.append(record.name)
        fsync_path(self.directory)
        for entry in sorted(self.directory.iterdir()):
            if is_payload(entry):
                shutil.rmtree(entry)
            elif entry.name.startswith(MANIFEST_NAME + _TMP_MARK) and entry.is_file():
                entry.unlink()
            else:
                continue
            removed.append(entry.name)
        return removed

    def claim(self) -> None:
        """Make ``backup_dir`` if it does not exist, marked as the library's own.

        Only a folder the library made is ever removed (by :meth:`prune`); one that existed before
        ``fit``, even empty, stays.
        """
        if self.directory.exists():
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / CREATED_NAME).touch()
        except OSError as exc:
            raise BackupWriteError(
                exc.errno,
                f"Cannot create backup_dir {self.directory} ({exc}). Expected a folder this process can "
                "create and write to; fix the permissions of its parent or choose another folder.",
            ) from exc

    def prune(self) -> None:
        """Remove ``backup_dir`` itself if the library made it and nothing else (no user file, no
        lock) is left in it."""
        try:
            if [entry.name for entry in self.directory.iterdir()] != [CREATED_NAME]:
                return
            (self.directory / CREATED_NAME).unlink()
            self.directory.rmdir()
        except OSError:
            pass

    def _committed(self) -> tuple[str | None, str]:
        """The committed manifest's payload name and text; (None, "") if none or unreadable."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
            return Manifest.from_json(text).payload, text
        except (FileNotFoundError, UnicodeDecodeError, CorruptBackupError, UnsupportedFormatError):
            return None, ""

    def _previous_payload(self) -> str | None:
        try:
            previous = self.read_previous()
        except (CorruptBackupError, UnsupportedFormatError):
            return None
        return previous.payload if previous else None

    def _write_tmp(self, text: str) -> Path:
        """Write ``text`` durably to a fresh temporary manifest file and return its path."""
        tmp = self.directory / f"{MANIFEST_NAME}{_TMP_MARK}{secrets.token_hex(4)}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _read(path: Path) -> Manifest | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise CorruptBackupError(f"{path} is not UTF-8 text ({exc}).") from exc
    return Manifest.from_json(text, source=str(path))


def is_our_record(path: Path) -> bool:
    """Whether the manifest file ``path`` was written by this library, so that deleting it is ours to do.

    A JSON object with ``format: unified-backup`` is ours, whatever else is wrong with it. A file that
    is not JSON (a damaged manifest) is ours if it still says that format or if our payload folder
    is beside it. Valid JSON of any other shape is a user's file that happens to share the name.
    """
    data = path.read_bytes()
    return is_our_text(data, has_payload=lambda: any(is_payload(entry) for entry in path.parent.iterdir()))


def is_our_text(data: bytes, has_payload: bool | Callable[[], bool]) -> bool:
    """:func:`is_our_record` for a record's bytes; ``has_payload``: whether our payload is beside it."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return _FORMAT_FIELD in data or (has_payload() if callable(has_payload) else has_payload)
    return isinstance(body, dict) and body.get("format") == FORMAT


def is_payload(path: Path) -> bool:
    """Whether ``path`` is a payload folder this library made (a user's ``payload-images/`` is not)."""
    return _PAYLOAD_NAME.fullmatch(path.name) is not None and path.is_dir()


def checksum_file(path: Path, *, sync: bool) -> str:
    """The file's sha256, read in one pass; with ``sync``, also flush it to stable storage."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Make a folder's entries (creations, renames), or a file's bytes, durable, without reading them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
