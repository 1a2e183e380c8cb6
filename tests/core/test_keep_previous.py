"""keep_previous=True: a second slot keeps the backup before the newest, restored if the newest is refused."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest

from unified_backup import (
    BackupOptions,
    CorruptBackupError,
    Counters,
    IncompatibleBackupError,
    InvalidArgumentError,
    Lifecycle,
    Slot,
)
from unified_backup.cli import main as cli
from unified_backup.lock import LOCK_NAME
from unified_backup.manifest import PREVIOUS_NAME
from unified_backup.slot import PAYLOAD_PREFIX

from .conftest import FakeState, epoch_end


def payloads(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(PAYLOAD_PREFIX))


def snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def train(backup_dir, backups, keep_previous=True):
    """A fit that commits ``backups`` backups (epochs 1..N, weights b"e1", b"e2", ...) and is interrupted."""
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, keep_previous=keep_previous)), FakeState()
    lifecycle.start(state)
    for epoch in range(1, backups + 1):
        epoch_end(lifecycle, state, f"e{epoch}".encode(), Counters(epoch, 0, 8 * epoch))
    lifecycle.finish(success=False)


def resume(backup_dir, keep_previous=True):
    state = FakeState(b"fresh")
    lifecycle = Lifecycle(BackupOptions(backup_dir, keep_previous=keep_previous))
    manifest = lifecycle.start(state)
    return lifecycle, state, manifest


def damage_newest_payload(backup_dir):
    slot = Slot(backup_dir)
    (slot.payload_dir(slot.read_manifest()) / "weights.bin").write_bytes(b"XX")


def refused(backup_dir, match, keep_previous=True) -> CorruptBackupError:
    """Resume must raise CorruptBackupError matching ``match`` and change no file of the backup."""
    before = snapshot(backup_dir)
    with pytest.raises(CorruptBackupError, match=match) as info:
        resume(backup_dir, keep_previous=keep_previous)
    assert snapshot(backup_dir) == before
    return info.value


def test_the_newest_and_the_previous_backup_are_kept_and_older_ones_removed(backup_dir):
    train(backup_dir, 3)
    slot = Slot(backup_dir, keep_previous=True)
    newest, previous = slot.read_manifest(), slot.read_previous()
    assert (newest.epoch, previous.epoch) == (3, 2)
    assert payloads(backup_dir) == sorted([newest.payload, previous.payload])
    slot.verify(newest)
    slot.verify(previous)
    assert (slot.payload_dir(previous) / "weights.bin").read_bytes() == b"e2"


def test_without_keep_previous_there_is_no_second_slot(backup_dir):
    train(backup_dir, 3, keep_previous=False)
    assert not (backup_dir / PREVIOUS_NAME).exists()
    assert len(payloads(backup_dir)) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: damage_newest_payload(d),
        lambda d: (d / "manifest.json").write_text("{not json"),
        lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"),
        lambda d: (Slot(d).payload_dir(Slot(d).read_manifest()) / "sub" / "extra.bin").unlink(),
    ],
    ids=["payload-flipped", "manifest-not-json", "manifest-not-utf8", "payload-file-missing"],
)
def test_a_refused_newest_backup_falls_back_to_the_previous_one_with_a_warning(backup_dir, damage, caplog):
    train(backup_dir, 3)
    damage(backup_dir)
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        lifecycle, state, manifest = resume(backup_dir)
    assert manifest.epoch == 2 and state.weights == b"e2" and state.loads == 1
    assert "keep_previous=True: restoring the previous backup" in caplog.text
    assert "because the newest one is refused" in caplog.text
    # The previous backup is now the committed one; the refused one is gone and nothing names it.
    slot = Slot(backup_dir, keep_previous=True)
    assert slot.read_manifest() == manifest and slot.read_previous() is None
    assert payloads(backup_dir) == [manifest.payload]
    # Training goes on and the second slot fills again.
    epoch_end(lifecycle, state, b"e3-again", Counters(3, 0, 24))
    assert (slot.read_manifest().epoch, slot.read_previous().epoch) == (3, 2)
    lifecycle.finish(success=True)
    assert not backup_dir.exists()


def test_both_refused_raises_naming_both_files_and_changes_nothing(backup_dir):
    train(backup_dir, 3)
    slot = Slot(backup_dir)
    damage_newest_payload(backup_dir)
    (slot.payload_dir(slot.read_previous()) / "weights.bin").write_bytes(b"YY")
    refused(backup_dir, r"(?s)weights.bin fails.*refused too: .*weights.bin fails")


def test_a_single_backup_has_nothing_to_fall_back_on(backup_dir):
    train(backup_dir, 1)
    damage_newest_payload(backup_dir)
    assert "previous" not in str(refused(backup_dir, "weights.bin fails its sha256 check"))


def test_without_keep_previous_a_kept_previous_backup_is_not_used(backup_dir):
    train(backup_dir, 3)
    damage_newest_payload(backup_dir)
    refused(backup_dir, "weights.bin fails its sha256 check", keep_previous=False)


def test_turning_keep_previous_off_drops_the_second_slot_at_the_next_start(backup_dir):
    train(backup_dir, 3)
    lifecycle, state, manifest = resume(backup_dir, keep_previous=False)
    assert manifest.epoch == 3 and state.weights == b"e3"
    assert not (backup_dir / PREVIOUS_NAME).exists() and payloads(backup_dir) == [manifest.payload]
    lifecycle.finish(success=False)


def test_an_unreadable_previous_record_is_dropped_and_the_newest_restored(backup_dir, caplog):
    train(backup_dir, 3)
    (backup_dir / PREVIOUS_NAME).write_text("{")
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        lifecycle, state, manifest = resume(backup_dir)
    assert manifest.epoch == 3 and state.weights == b"e3"
    assert "Dropping the unreadable previous backup" in caplog.text
    assert not (backup_dir / PREVIOUS_NAME).exists() and payloads(backup_dir) == [manifest.payload]
    lifecycle.finish(success=False)


def test_an_incompatible_training_changes_nothing_even_with_a_fallback_at_hand(backup_dir):
    train(backup_dir, 3)
    damage_newest_payload(backup_dir)
    before = snapshot(backup_dir)
    state = FakeState(b"fresh", shape="float32[8]")
    with pytest.raises(IncompatibleBackupError, match=r"model/w"):
        Lifecycle(BackupOptions(backup_dir, keep_previous=True)).start(state)
    # The fingerprint refused the previous backup too: nothing was loaded, promoted or removed.
    assert state.loads == 0 and snapshot(backup_dir) == before


def test_success_deletes_both_slots(backup_dir):
    train(backup_dir, 2)
    lifecycle, _, manifest = resume(backup_dir)
    assert manifest.epoch == 2
    lifecycle.finish(success=True)
    assert not backup_dir.exists()


def test_keep_previous_must_be_a_bool(backup_dir):
    with pytest.raises(InvalidArgumentError, match=r"keep_previous='yes'. Expected True or False"):
        BackupOptions(backup_dir, keep_previous="yes")


def test_cli_inspects_and_verifies_the_previous_backup(backup_dir, capsys):
    train(backup_dir, 3)
    assert cli(["inspect", str(backup_dir)]) == 0
    assert "previous" in capsys.readouterr().out
    assert cli(["verify", str(backup_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK: " in out and "OK (previous backup): " in out and "global step 16" in out
    slot = Slot(backup_dir)
    (slot.payload_dir(slot.read_previous()) / "weights.bin").write_bytes(b"YY")
    assert cli(["verify", str(backup_dir)]) == 1
    assert "weights.bin fails its sha256 check" in capsys.readouterr().err


def test_a_previous_record_of_a_future_version_is_named_in_the_error(backup_dir):
    train(backup_dir, 3)
    damage_newest_payload(backup_dir)
    record = backup_dir / PREVIOUS_NAME
    record.write_text(record.read_text().replace('"version": 1', '"version": 2'))
    refused(backup_dir, r"(?s)weights.bin fails.*refused too: .*manifest.previous.json")


def test_a_missing_previous_payload_is_named_by_its_own_record(backup_dir):
    train(backup_dir, 3)
    damage_newest_payload(backup_dir)
    slot = Slot(backup_dir)
    shutil.rmtree(slot.payload_dir(slot.read_previous()))
    refused(backup_dir, r"refused too: .*manifest.previous.json names payload folder")


def test_open_picks_the_fallback_without_changing_anything_and_restore_reuses_it(backup_dir, monkeypatch):
    train(backup_dir, 3)
    damage_newest_payload(backup_dir)
    before = snapshot(backup_dir)
    lifecycle = Lifecycle(BackupOptions(backup_dir, keep_previous=True))
    verified = []
    original = Slot.verify
    monkeypatch.setattr(
        Slot, "verify", lambda self, m, record=None: verified.append(m.epoch) or original(self, m, record)
    )
    state = FakeState(b"fresh")
    assert lifecycle.open(state).epoch == 2
    assert snapshot(backup_dir) == before and verified == [3, 2] and state.loads == 0
    assert lifecycle.restore().epoch == 2 and state.weights == b"e2"
    assert verified == [3, 2]  # restore used the verified choice: each backup was hashed once
    assert Slot(backup_dir).read_manifest().epoch == 2
    lifecycle.finish(success=False)
