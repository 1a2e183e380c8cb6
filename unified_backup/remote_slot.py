"""The backup slot in a remote ``backup_dir`` (``s3://``, ``gs://``): the same layout and the same
commit as :class:`~unified_backup.slot.Slot`, without a rename (object stores have none).

Layout (object names under the URL)::

    manifest.json                 the commit record, written last, in one request
    manifest.previous.json        with keep_previous=True: the record of the backup before it
    payload-<id>/...              the files of a committed backup (or of one being uploaded)
    .unified-backup.lock          the lease (see lease.py)

Commit order (:meth:`RemoteSlot.commit`):
    1. the adapter has written the payload into a local staging folder named ``payload-<id>``, under
       ``staging_dir`` (:meth:`RemoteSlot.stage`);
    2. every file is checksummed (unless the adapter did it while writing) and uploaded under the
       fresh prefix ``payload-<id>/``, several at once (S3 splits large files into parallel parts);
    3. the lease is renewed, which proves this job still owns ``backup_dir``;
    3b. with ``keep_previous``, the committed manifest's bytes are written as ``manifest.previous.json``;
    4. ``manifest.json`` is written in one request: the commit. An object store makes a single object
       write atomic (readers see the old object or the new one) and, on S3 and GCS, strongly
       consistent (a read after the write sees it);
    5. the payload that no manifest names any more is deleted.
A crash before 4 leaves the old backup committed and an unnamed prefix, which the next start deletes
with a warning; the local staging folder is removed on every outcome but a kill, and a killed
process's staging folders are removed by the next start on the same host.
Restoring downloads the payload into the staging folder and checks every file against the manifest
before anything is loaded (:meth:`RemoteSlot.fetch`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from unified_backup.errors import BackupError, BackupWriteError, CorruptBackupError, UnsupportedFormatError
from unified_backup.lease import Lease, pid_namespace, process_gone
from unified_backup.manifest import (
    CHECKSUM_ALGORITHM,
    MANIFEST_NAME,
    PREVIOUS_NAME,
    FileEntry,
    Header,
    Manifest,
)
from unified_backup.slot import (
    _PAYLOAD_NAME,
    PAYLOAD_PREFIX,
    Slot,
    checksum_file,
    is_our_text,
    relative_files,
)
from unified_backup.store import ObjectStore, is_remote

TRANSFERS = 8  # files uploaded or downloaded at once
_STAGING = re.compile(r"unified-backup-staging-(?P<host>.+)-(?P<pidns>\d+)-(?P<pid>\d+)-[0-9a-f]{8}")
log = logging.getLogger(__name__)


class RemoteSlot:
    """One URL prefix that holds one committed backup (and with ``keep_previous`` the one before it)."""

    remote = True

    def __init__(
        self,
        url: str,
        keep_previous: bool = False,
        *,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.store = ObjectStore(url, storage_options)
        self.directory = self.store.show()  # what messages name
        self.keep_previous = keep_previous
        self.manifest_path = self.store.show(MANIFEST_NAME)
        self.previous_path = self.store.show(PREVIOUS_NAME)
        self.staging_dir = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())
        self._root: Path | None = None  # this process's staging folder, made when first needed
        self._fetched: dict[str, Path] = {}  # payload name -> its verified download
        self._lease: Lease | None = None

    def __repr__(self) -> str:
        return f"RemoteSlot({self.directory!r})"

    def lock(self, before_takeover: Callable[[], None] | None = None) -> Lease:
        """The lease that keeps other trainings off this ``backup_dir``; commits confirm it first."""
        self._lease = Lease(self.store, before_takeover)
        return self._lease

    # -- reading ---------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        return self._read(MANIFEST_NAME)

    def read_previous(self) -> Manifest | None:
        return self._read(PREVIOUS_NAME)

    def _read(self, name: str) -> Manifest | None:
        data = self.store.read(name)
        if data is None:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptBackupError(f"{self.store.show(name)} is not UTF-8 text ({exc}).") from exc
        return Manifest.from_json(text, source=self.store.show(name))

    def payload_dir(self, manifest: Manifest) -> str:
        """Where the backup's files are, as messages show it."""
        return self.store.show(manifest.payload)

    def verify(self, manifest: Manifest, record: Path | str | None = None) -> None:
        """Download the payload and check every file against the manifest (see :meth:`Slot.verify`);
        the verified download is what :meth:`fetch` then hands to ``load``."""
        record = record or self.manifest_path
        if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise UnsupportedFormatError(
                f"{record} uses checksum {manifest.checksum_algorithm!r}; this version "
                f"verifies {CHECKSUM_ALGORITHM!r}. Upgrade unified-backup to restore it."
            )
        delete = "delete it (`unified-backup delete BACKUP_DIR`) to start fresh"
        payload = self.store.show(manifest.payload)
        found = self.store.sizes(manifest.payload + "/") if _PAYLOAD_NAME.fullmatch(manifest.payload) else {}
        found = {name.split("/", 1)[1]: size for name, size in found.items()}
        if not found:
            raise CorruptBackupError(
                f"{record} names payload {manifest.payload!r}, which does not exist in {self.directory}. "
                f"The backup is incomplete; {delete}."
            )
        for name in sorted(found.keys() - manifest.files.keys()):
            raise CorruptBackupError(
                f"{payload}/{name} is not listed in the manifest: expected only the files the backup "
                f"committed. Remove that object, or {delete}."
            )
        for name, entry in sorted(manifest.files.items()):
            if name not in found:
                raise CorruptBackupError(
                    f"{payload}/{name} is missing: the manifest lists it with {entry.bytes} bytes. The "
                    f"backup is incomplete; {delete}."
                )
            if found[name] != entry.bytes:
                raise CorruptBackupError(
                    f"{payload}/{name} has {found[name]} bytes; the manifest expects {entry.bytes} "
                    f"(truncated or overwritten). Nothing was loaded; {delete}."
                )
        local = self._staging() / f"restore-{secrets.token_hex(4)}" / manifest.payload
        try:
            self._transfer(
                lambda name: self._download(f"{manifest.payload}/{name}", local / name),
                sorted(manifest.files),
            )
            for name, entry in sorted(manifest.files.items()):
                digest = checksum_file(local / name, sync=False)
                if digest != entry.checksum:
                    raise CorruptBackupError(
                        f"{payload}/{name} fails its {CHECKSUM_ALGORITHM} check: expected {entry.checksum}, "
                        f"computed {digest}. The object was altered after the commit; nothing was loaded. "
                        f"Delete the backup (`unified-backup delete BACKUP_DIR`) to start fresh."
                    )
        except BaseException:
            shutil.rmtree(local.parent, ignore_errors=True)
            raise
        self._fetched[manifest.payload] = local

    def fetch(self, manifest: Manifest) -> Path:
        """The local folder of the backup's files, downloaded and verified (once per process)."""
        if manifest.payload not in self._fetched:
            try:
                self.verify(manifest)
            except OSError as exc:
                raise BackupError(
                    f"Downloading the backup from {self.directory} failed ({exc}); nothing was loaded and "
                    "the backup is left as it is. Check that the store is reachable, then start again."
                ) from exc
        return self._fetched[manifest.payload]

    def _download(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.store.download(name, local)

    # -- writing ---------------------------------------------------------------------------
    def stage(self) -> Path:
        """A fresh, empty local folder for the next backup; its name is the payload's prefix."""
        path = self._staging() / f"{PAYLOAD_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def commit(self, staged: Path, header: Header, checksums: Mapping[str, str] | None = None) -> Manifest:
        """Upload ``staged`` and make it the committed backup (see the module docstring).

        The local folder is removed whatever happens. A failure before the manifest's write leaves
        the previous backup committed (:class:`BackupWriteError`); a lease another job took over
        raises :class:`BackupDirInUseError`, and nothing is committed.
        """
        known = dict(checksums or {})
        names = sorted(relative_files(staged))
        unknown = sorted(set(known) - set(names))
        if unknown:
            shutil.rmtree(staged, ignore_errors=True)
            raise BackupError(
                f"The training state reported checksums of {', '.join(unknown)}, which it did not write into "
                f"{staged}. This is a bug in the adapter: please report it."
            )
        prefix, uploaded, committing = staged.name, False, False
        try:
            files = {
                name: FileEntry(
                    (staged / name).stat().st_size,
                    known.get(name) or checksum_file(staged / name, sync=False),
                )
                for name in names
            }
            manifest = Manifest.commit_record(header, files, prefix)
            uploaded = True
            self._transfer(lambda name: self.store.upload(staged / name, f"{prefix}/{name}"), names)
            committed = self.store.read(MANIFEST_NAME)
            older = self._payload_of(self.store.read(PREVIOUS_NAME))
            if self.keep_previous and self._payload_of(committed) is not None:
                self.store.write(PREVIOUS_NAME, committed)  # type: ignore[arg-type]
            elif older is not None:
                self.store.remove([PREVIOUS_NAME])  # a previous record must never name a removed payload
            if self._lease is not None:  # proves ownership just before the commit (see lease.py)
                self._lease.confirm()
            committing = True
            with self.store.tidying():  # one attempt: a late write must not land after a takeover
                self.store.write(MANIFEST_NAME, manifest.to_json().encode())  # the commit
        except OSError as exc:
            landed = self._committed_now(prefix) if committing else False
            if not landed:  # else the write landed and only its answer was lost: committed
                if uploaded and not committing:  # once the manifest is being written, the next start decides
                    self._remove_prefixes([prefix], quiet=True)
                outcome = (
                    "the last backup is still committed and intact"
                    if landed is False
                    else "whether the new manifest was written is unknown; the next start restores whichever "
                    "backup is committed"
                )
                raise BackupWriteError(
                    exc.errno or errno.EIO,
                    f"Uploading the backup to {self.directory} failed ({exc}); {outcome}. Check that the "
                    "store is reachable and writable.",
                ) from exc
        except BaseException:
            if uploaded and not committing:
                self._remove_prefixes([prefix], quiet=True)
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        kept = {prefix, self._payload_of(committed) if self.keep_previous else None}
        unnamed = {self._payload_of(committed), older} - kept - {None}
        self._remove_prefixes(sorted(n for n in unnamed if n is not None), quiet=True)
        return manifest

    def _committed_now(self, prefix: str) -> bool | None:
        """Whether the manifest names ``prefix`` now; None when the store cannot tell."""
        try:
            return self._payload_of(self.store.read(MANIFEST_NAME)) == prefix
        except OSError:
            return None

    def discard(self, staged: Path) -> None:
        """Remove a local staging folder that will not be committed."""
        shutil.rmtree(staged, ignore_errors=True)

    def promote_previous(self) -> None:
        """Make the previous backup the committed one (the newest was refused): one write, then the
        previous record goes (both naming the same payload in between is a valid pair)."""
        data = self.store.read(PREVIOUS_NAME)
        if data is None:
            raise CorruptBackupError(f"{self.previous_path} disappeared while it was being restored.")
        self.store.write(MANIFEST_NAME, data)
        self.store.remove([PREVIOUS_NAME])

    def remove_leftovers(self, manifest: Manifest | None, previous: Manifest | None = None) -> list[str]:
        """Delete the payloads neither ``manifest`` nor ``previous`` names (uploads a kill or a failure
        interrupted, a backup no longer kept), with a warning; see :meth:`Slot.remove_leftovers`."""
        keep = {m.payload for m in (manifest, previous) if m is not None}
        removed = []
        if previous is None:
            data = self.store.read(PREVIOUS_NAME)
            if data is not None:
                if not is_our_text(data, has_payload=bool(self._prefixes())):
                    raise UnsupportedFormatError(
                        f"{self.previous_path} is not a unified-backup manifest: the library keeps the "
                        "previous backup's record under that name, and will not delete an object it did not "
                        "write. Move that object out of backup_dir; it should hold only the library's "
                        "objects."
                    )
                self.store.remove([PREVIOUS_NAME])
                removed.append(PREVIOUS_NAME)
        unnamed = sorted(self._prefixes() - keep)
        if unnamed and self._lease is not None and self._lease.stale_takeover:
            log.warning(
                "Left %d payload(s) in %s that no manifest names: the lease was taken from an owner only "
                "presumed gone, which might still be uploading. A later start removes them: %s",
                len(unnamed),
                self.directory,
                ", ".join(unnamed),
            )
            return removed
        self._remove_prefixes(unnamed, quiet=False)
        removed += [name + "/" for name in unnamed]
        if unnamed:
            log.warning(
                "Removed %d payload(s) in %s that no manifest names (an upload that was interrupted, or a "
                "backup no longer kept): %s",
                len(unnamed),
                self.directory,
                ", ".join(unnamed),
            )
        return removed

    def delete(self) -> list[str]:
        """Remove the committed backup and every object the library wrote; keep the user's objects
        (see :meth:`Slot.delete`)."""
        removed = []
        has_payload = bool(self._prefixes())
        for name, shown in ((PREVIOUS_NAME, self.previous_path), (MANIFEST_NAME, self.manifest_path)):
            data = self.store.read(name)
            if data is None:
                continue
            if not is_our_text(data, has_payload=has_payload):
                log.warning(
                    "Left %s in place: it is not a manifest unified-backup wrote, so it is not the library's "
                    "to delete. Move it out of %s, or delete it yourself if it was a backup's.",
                    shown,
                    self.directory,
                )
                continue
            self.store.remove([name])
            removed.append(name)
        prefixes = sorted(self._prefixes())
        self._remove_prefixes(prefixes, quiet=False)
        return removed + [name + "/" for name in prefixes]

    def claim(self) -> None:
        """Check that the bucket exists and answers, and remove the staging folders of this host's
        processes that were killed; nothing is created (an object store has no folders)."""
        try:
            self.store.reachable()
        except OSError as exc:
            raise BackupWriteError(
                exc.errno or errno.EIO,
                f"Cannot use backup_dir {self.directory} ({exc}). Expected an existing bucket that this "
                "process can reach and write to; create it, or check the endpoint and credentials.",
            ) from exc
        self._remove_dead_staging()

    def prune(self) -> None:
        """Nothing to prune: an object store has no folder to remove. Drops this process's staging."""
        self.cleanup()

    def cleanup(self) -> None:
        """Remove this process's local staging folder (uploads, verified downloads)."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
        self._root = None
        self._fetched.clear()

    # -- helpers ---------------------------------------------------------------------------
    def _staging(self) -> Path:
        if self._root is None or not self._root.is_dir():
            host, pid = socket.gethostname(), os.getpid()
            name = f"unified-backup-staging-{host}-{pid_namespace() or 0}-{pid}-{secrets.token_hex(4)}"
            try:
                self.staging_dir.mkdir(parents=True, exist_ok=True)
                (self.staging_dir / name).mkdir(mode=0o700)  # the weights: this user's only
            except OSError as exc:
                raise BackupWriteError(
                    exc.errno or errno.EIO,
                    f"Cannot make a staging folder in staging_dir={str(self.staging_dir)!r} ({exc}). "
                    "Expected a local folder this process can write to, with room for one backup; pass "
                    "another staging_dir.",
                ) from exc
            self._root = self.staging_dir / name
        return self._root

    def _remove_dead_staging(self) -> None:
        """Remove the staging folders of processes of this host that no longer run (killed ones)."""
        with contextlib.suppress(OSError):
            for entry in self.staging_dir.iterdir():
                match = _STAGING.fullmatch(entry.name)
                if match is None or (match["host"], match["pidns"]) != (
                    socket.gethostname(),
                    pid_namespace(),
                ):
                    continue
                if process_gone(int(match["pid"])):
                    shutil.rmtree(entry, ignore_errors=True)

    def _prefixes(self) -> set[str]:
        """The payload prefixes in ``backup_dir``: the library's, by name."""
        return {
            name.split("/", 1)[0]
            for name in self.store.sizes()
            if "/" in name and _PAYLOAD_NAME.fullmatch(name.split("/", 1)[0])
        }

    def _remove_prefixes(self, prefixes: list[str], *, quiet: bool) -> None:
        if not prefixes:
            return
        try:
            with self.store.tidying() if quiet else contextlib.nullcontext():
                objects = self.store.sizes()
                self.store.remove(sorted(n for n in objects if n.split("/", 1)[0] in set(prefixes)))
        except OSError as exc:
            if not quiet:
                raise
            log.warning(
                "Could not remove %s in %s (%s); the next start removes it.",
                ", ".join(prefixes),
                self.directory,
                exc,
            )

    def _payload_of(self, data: bytes | None) -> str | None:
        if data is None:
            return None
        try:
            return Manifest.from_json(data.decode("utf-8")).payload
        except (UnicodeDecodeError, CorruptBackupError, UnsupportedFormatError):
            return None

    def _transfer(self, one: Callable[[str], None], names: list[str]) -> None:
        """``one(name)`` for every name, :data:`TRANSFERS` at a time; the first failure is raised."""
        if len(names) <= 1:
            for name in names:
                one(name)
            return
        pool = concurrent.futures.ThreadPoolExecutor(min(TRANSFERS, len(names)))
        try:
            for future in [pool.submit(one, name) for name in names]:
                future.result()
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, the files not begun are not tried


def slot_for(
    backup_dir: str | os.PathLike[str],
    keep_previous: bool = False,
    *,
    storage_options: Mapping[str, Any] | None = None,
    staging_dir: str | os.PathLike[str] | None = None,
) -> Slot | RemoteSlot:
    """The slot of ``backup_dir``: a :class:`RemoteSlot` for an object store's URL, else a :class:`Slot`."""
    if is_remote(backup_dir):
        return RemoteSlot(
            str(backup_dir), keep_previous, storage_options=storage_options, staging_dir=staging_dir
        )
    return Slot(backup_dir, keep_previous)
