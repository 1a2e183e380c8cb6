"""Which backup a starting ``fit`` restores: the newest, or with ``keep_previous`` the one before it.

:func:`choose` reads and verifies only; :func:`settle` changes the folder once the choice is also
known to fit the live training (the lifecycle checks the fingerprint in between). So a refused
backup never gets anything promoted or removed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from unified_backup.errors import (
    CorruptBackupError,
    IncompatibleBackupError,
    InvalidBackupError,
    UnsupportedFormatError,
)
from unified_backup.manifest import Manifest
from unified_backup.slot import Slot

if TYPE_CHECKING:
    from unified_backup.remote_slot import RemoteSlot

log = logging.getLogger(__name__)


def choose(
    slot: Slot | RemoteSlot, framework: str, *, keep_previous: bool
) -> tuple[Manifest | None, CorruptBackupError | None]:
    """The verified backup to restore (None: none committed), and why the newest was refused when
    the choice is the previous one. Raises the specific :class:`InvalidBackupError` otherwise."""
    try:
        manifest = slot.read_manifest()
        if manifest is not None:
            _check_framework(slot, manifest, framework)
            slot.verify(manifest)
        return manifest, None
    except CorruptBackupError as refused:
        if not keep_previous:
            raise
        return _previous_instead(slot, refused, framework), refused


def settle(
    slot: Slot | RemoteSlot, manifest: Manifest | None, refused: str | None, *, keep_previous: bool
) -> None:
    """Make the chosen ``manifest`` the committed backup (promoting the previous one when the newest
    was ``refused``) and remove every leftover: staging areas, temporary records, a refused payload."""
    if manifest is not None and refused is not None:
        log.warning(
            "keep_previous=True: restoring the previous backup in %s (%d epoch(s) done, step %d of the "
            "next, global step %d), because the newest one is refused and will be removed: %s",
            slot.directory,
            manifest.epoch,
            manifest.step_in_epoch,
            manifest.global_step,
            refused,
        )
        slot.promote_previous()
    slot.remove_leftovers(manifest, _kept_previous(slot, manifest) if keep_previous else None)


def _previous_instead(slot: Slot | RemoteSlot, refused: CorruptBackupError, framework: str) -> Manifest:
    """The previous backup, verified; else raise ``refused`` (saying why the previous one fails too)."""
    try:
        previous = slot.read_previous()
        if previous is not None:
            _check_framework(slot, previous, framework)
            slot.verify(previous, record=slot.previous_path)
    except InvalidBackupError as also:
        raise CorruptBackupError(
            f"{refused} The previous backup (keep_previous=True) is refused too: {also}"
        ) from refused
    if previous is None:  # none kept yet: the first backup of a training has no previous one
        raise refused
    return previous


def _kept_previous(slot: Slot | RemoteSlot, manifest: Manifest | None) -> Manifest | None:
    """The previous backup's manifest when it is to be kept, else None (its files are removed)."""
    if manifest is None:
        return None
    try:
        return slot.read_previous()
    except (CorruptBackupError, UnsupportedFormatError) as exc:
        log.warning("Dropping the unreadable previous backup in %s: %s", slot.directory, exc)
        return None


def _check_framework(slot: Slot | RemoteSlot, manifest: Manifest, framework: str) -> None:
    if manifest.framework != framework:
        raise IncompatibleBackupError(
            f"The backup in {slot.directory} was written by {manifest.framework} "
            f"{manifest.framework_version}; this training runs {framework}. Nothing was loaded. "
            "Use a separate backup_dir for each framework, or delete this backup (`unified-backup "
            "delete BACKUP_DIR`) to start fresh."
        )
