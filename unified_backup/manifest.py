"""The manifest: the one JSON record that describes, and commits, a backup.

``backup_dir/manifest.json`` is written last, by an atomic rename; a payload folder that
no manifest names is not a backup. Both adapters and the CLI read the same fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from unified_backup.errors import CorruptBackupError, UnsupportedFormatError

FORMAT = "unified-backup"
VERSION = 1
MANIFEST_NAME = "manifest.json"
PREVIOUS_NAME = "manifest.previous.json"  # the second slot's commit record (keep_previous=True)
CHECKSUM_ALGORITHM = "sha256"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """Size and checksum of one payload file."""

    bytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "checksum": self.checksum}


@dataclasses.dataclass(frozen=True)
class Counters:
    """Training progress at a backup point.

    Attributes:
        epoch: completed epochs.
        step_in_epoch: optimizer steps done in the epoch that follows (0 at an epoch end).
        global_step: optimizer steps since the start of training.
    """

    epoch: int
    step_in_epoch: int
    global_step: int


@dataclasses.dataclass(frozen=True)
class Header:
    """What the lifecycle knows about a backup before its files are written: the manifest's own fields."""

    framework: str
    framework_version: str
    counters: Counters
    fingerprint: Mapping[str, str]
    topology: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A committed backup: who wrote it, how far training was, and what its files hold."""

    framework: str
    framework_version: str
    epoch: int
    step_in_epoch: int
    global_step: int
    fingerprint: Mapping[str, str]
    files: Mapping[str, FileEntry]
    payload: str
    topology: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    created_at: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def commit_record(cls, header: Header, files: Mapping[str, FileEntry], payload: str) -> Manifest:
        """The manifest that commits ``payload`` (whose ``files`` were checksummed) for ``header``."""
        return cls(
            framework=header.framework,
            framework_version=header.framework_version,
            epoch=header.counters.epoch,
            step_in_epoch=header.counters.step_in_epoch,
            global_step=header.counters.global_step,
            fingerprint=dict(header.fingerprint),
            files=files,
            payload=payload,
            topology=dict(header.topology),
        )

    @property
    def counters(self) -> Counters:
        return Counters(self.epoch, self.step_in_epoch, self.global_step)

    @property
    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.files.values())

    def to_json(self) -> str:
        body = self._body()
        body["manifest_checksum"] = _digest(body)
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    def _body(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "framework": self.framework,
            "framework_version": self.framework_version,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "created_at": self.created_at,
            "fingerprint": dict(self.fingerprint),
            "topology": dict(self.topology),
            "checksum_algorithm": self.checksum_algorithm,
            "payload": self.payload,
            "files": {name: entry.to_json() for name, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest; raise a specific error naming ``source`` if it is unusable."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise CorruptBackupError(
                f"{source} is not valid JSON ({exc}). Expected the manifest that unified-backup writes "
                "last when it commits a backup. Delete the backup (`unified-backup delete BACKUP_DIR`) "
                "to start fresh, "
                "or restore the file from a copy."
            ) from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise UnsupportedFormatError(
                f"{source} is not a unified-backup manifest: expected format={FORMAT!r}, found {found!r}. "
                "Point backup_dir at a folder used only by unified-backup."
            )
        version = body.get("version")
        if not isinstance(version, int) or version != VERSION:
            raise UnsupportedFormatError(
                f"{source} has manifest version {version!r}; this unified-backup reads version {VERSION}. "
                "Upgrade unified-backup to restore it, or delete the backup (`unified-backup delete "
                "BACKUP_DIR`) to start fresh."
            )
        stored = body.pop("manifest_checksum", None)
        if stored != _digest(body):
            raise CorruptBackupError(
                f"{source} fails its own checksum (expected {stored!r}, computed {_digest(body)!r}): "
                "the manifest was altered after it was committed. The backup cannot be trusted; "
                "delete it (`unified-backup delete BACKUP_DIR`) to start fresh."
            )
        try:
            files = {
                name: FileEntry(int(e["bytes"]), str(e["checksum"])) for name, e in body["files"].items()
            }
            return cls(
                framework=str(body["framework"]),
                framework_version=str(body["framework_version"]),
                epoch=int(body["epoch"]),
                step_in_epoch=int(body["step_in_epoch"]),
                global_step=int(body["global_step"]),
                fingerprint={str(k): str(v) for k, v in body["fingerprint"].items()},
                files=files,
                payload=str(body["payload"]),
                topology=dict(body.get("topology", {})),
                created_at=str(body["created_at"]),
                checksum_algorithm=str(body["checksum_algorithm"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptBackupError(
                f"{source} lacks a required field or has a wrong type ({exc!r}). "
                "The backup cannot be trusted; delete it (`unified-backup delete BACKUP_DIR`) to start fresh."
            ) from exc


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
