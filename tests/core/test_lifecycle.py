import json
import logging

import pytest

from unified_backup import (
    BackupOptions,
    BackupWriteError,
    CorruptBackupError,
    Counters,
    IncompatibleBackupError,
    Lifecycle,
    Position,
    Slot,
    UnsupportedFormatError,
)
from unified_backup.lock import LOCK_NAME

from .conftest import FakeState, epoch_end


def test_fresh_start_backup_and_success_delete(backup_dir):
    lifecycle = Lifecycle(BackupOptions(backup_dir))
    state = FakeState(b"w")
    assert lifecycle.start(state) is None and state.loads == 0
    assert (backup_dir / LOCK_NAME).exists()
    manifest = epoch_end(lifecycle, state, b"w", Counters(1, 0, 8))
    assert manifest.epoch == 1 and lifecycle.stats.backups == 1 and lifecycle.stats.seconds > 0
    lifecycle.finish(success=True)
    assert not backup_dir.exists()


def test_failure_keeps_the_backup_and_restore_loads_it(committed):
    state = FakeState(b"fresh")
    lifecycle = Lifecycle(BackupOptions(committed))
    manifest = lifecycle.start(state)
    assert manifest.counters == Counters(2, 0, 16)
    assert state.weights == b"committed" and state.loads == 1
    assert lifecycle.restored == manifest
    lifecycle.finish(success=True)
    assert lifecycle.restored == manifest  # what the last fit resumed from, for the user to see


def test_delete_checkpoint_false_keeps_the_backup(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, delete_checkpoint=False)), FakeState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"w", Counters(1, 0, 8))
    lifecycle.finish(success=True)
    assert Slot(backup_dir).read_manifest().epoch == 1
    assert not (backup_dir / LOCK_NAME).exists()


def test_fingerprint_mismatch_names_the_variable_and_loads_nothing(committed):
    before = sorted(p.name for p in committed.rglob("*"))
    state = FakeState(b"fresh", shape="float32[8]")
    with pytest.raises(
        IncompatibleBackupError, match=r"model/w: backup has float32\[4\], training has float32\[8\]"
    ):
        Lifecycle(BackupOptions(committed)).start(state)
    assert state.weights == b"fresh" and state.loads == 0
    assert sorted(p.name for p in committed.rglob("*")) == before
    # The refusal released the lock: a corrected training can resume.
    assert Lifecycle(BackupOptions(committed)).start(FakeState()).epoch == 2


def test_other_framework_is_refused(committed):
    state = FakeState()
    state.framework = "lightning"
    with pytest.raises(IncompatibleBackupError, match="written by fake 1.0; this training runs lightning"):
        Lifecycle(BackupOptions(committed)).start(state)


def test_corrupt_payload_is_refused_and_kept(committed):
    manifest = Slot(committed).read_manifest()
    victim = Slot(committed).payload_dir(manifest) / "weights.bin"
    victim.write_bytes(b"tampered!")
    state = FakeState(b"fresh")
    with pytest.raises(CorruptBackupError, match="weights.bin"):
        Lifecycle(BackupOptions(committed)).start(state)
    assert state.loads == 0 and victim.read_bytes() == b"tampered!"


def test_damaged_manifest_never_gets_its_payload_deleted(committed):
    manifest_path = committed / "manifest.json"
    body = json.loads(manifest_path.read_text())
    body["version"] = 99
    manifest_path.write_text(json.dumps(body))
    payload = committed / body["payload"]
    with pytest.raises(UnsupportedFormatError, match="version 99"):
        Lifecycle(BackupOptions(committed)).start(FakeState())
    assert payload.is_dir() and (payload / "weights.bin").exists()


def test_failed_load_releases_the_lock(committed):
    class Broken(FakeState):
        def load(self, directory, manifest, coordinator):
            raise RuntimeError("framework exploded")

    with pytest.raises(RuntimeError):
        Lifecycle(BackupOptions(committed)).start(Broken())
    assert not (committed / LOCK_NAME).exists()


def test_failed_save_leaves_the_previous_backup_committed(committed):
    lifecycle, state = Lifecycle(BackupOptions(committed)), FakeState()
    lifecycle.start(state)
    state.failure = OSError(28, "No space left on device")
    with pytest.raises(BackupWriteError, match="last backup .* is still committed"):
        epoch_end(lifecycle, state, b"full", Counters(3, 0, 24))
    slot = Slot(committed)
    manifest = slot.read_manifest()
    slot.verify(manifest)
    assert manifest.epoch == 2
    assert [p.name for p in committed.iterdir() if p.name.startswith("payload-")] == [manifest.payload]


def test_leftover_staging_is_removed_at_start_with_a_warning(committed, caplog):
    orphan = Slot(committed).stage()
    (orphan / "weights.bin").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        manifest = Lifecycle(BackupOptions(committed)).start(FakeState())
    assert not orphan.exists() and manifest.epoch == 2
    assert "incomplete backup" in caplog.text


def test_boundaries_back_up_every_save_freq_steps_or_at_each_epoch_end_once(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, save_freq=3)), FakeState()
    lifecycle.start(state)
    committed = [step for step in range(1, 8) if lifecycle.boundary(Position(0, step, step, step))]
    assert committed == [3, 6] and Slot(backup_dir).read_manifest().counters == Counters(0, 6, 6)
    assert lifecycle.boundary(Position.epoch_end(1, 8), epoch_end=True) is None  # 2 steps since the last
    lifecycle.finish(success=False)

    lifecycle = Lifecycle(BackupOptions(backup_dir))
    lifecycle.start(state)
    assert not any(lifecycle.boundary(Position(2, step, 16 + step, step)) for step in range(1, 8))
    assert lifecycle.boundary(Position.epoch_end(3, 24), epoch_end=True).counters == Counters(3, 0, 24)
    assert lifecycle.boundary(Position.epoch_end(3, 24), epoch_end=True) is None  # never one step twice
    assert lifecycle.stats.backups == 1
    lifecycle.finish(success=True)
