"""Disk faults during training: the previous backup stays committed; stop (default) or train on."""

from __future__ import annotations

import logging
import os

from unified_backup import BackupWriteError, Slot
from unified_backup.slot import PAYLOAD_PREFIX

from ..faults import fill, tmpfs
from .driver import STEPS_PER_EPOCH


def committed(backup_dir):
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    slot.verify(manifest)
    assert [p.name for p in backup_dir.iterdir() if p.name.startswith(PAYLOAD_PREFIX)] == [manifest.payload]
    return manifest


def test_disk_full_stops_training_and_keeps_the_previous_backup(driver, tmp_path):
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "backup"
        result = driver.fit(driver.new_run(), backup_dir, epochs=4, interrupt=(2, 1))
        assert isinstance(result.error, RuntimeError)
        before = committed(backup_dir)
        fill(mount)
        result = driver.fit(driver.new_run(seed=1), backup_dir, epochs=4)
        assert isinstance(result.error, BackupWriteError), repr(result.error)
        message = str(result.error)
        assert "No space left on device" in message and "still committed and intact" in message
        assert result.global_step == 3 * STEPS_PER_EPOCH  # no step trained after the failed backup
        assert committed(backup_dir) == before


def test_disk_full_with_warn_trains_to_the_end(driver, tmp_path, caplog):
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "backup"
        driver.fit(driver.new_run(), backup_dir, epochs=4, interrupt=(2, 1))
        before = committed(backup_dir)
        fill(mount)
        with caplog.at_level(logging.WARNING):
            result = driver.fit(driver.new_run(seed=1), backup_dir, epochs=4, on_write_error="warn")
        assert result.error is None and result.epochs_run == [2, 3]
        assert caplog.text.count("Backup skipped") == 2  # after epochs 2 and 3
        assert before.epoch == 2 and not backup_dir.exists()  # fit ended well: deleted


WIDE = 2048  # hidden units: a payload of about 150 kB, more than the room left below


def test_a_disk_that_fills_during_the_write_is_a_write_error(driver, tmp_path, caplog):
    """Room for part of a backup only: the write fails midway, and that is a write error like any other."""
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "backup"
        driver.fit(driver.new_run(width=WIDE), backup_dir, epochs=4, interrupt=(2, 1))
        before = committed(backup_dir)
        filler = fill(mount)
        os.truncate(filler, filler.stat().st_size - 64 * 1024)  # 64 kB free
        result = driver.fit(driver.new_run(seed=1, width=WIDE), backup_dir, epochs=4)
        assert isinstance(result.error, BackupWriteError), repr(result.error)
        assert committed(backup_dir) == before
        with caplog.at_level(logging.WARNING):
            run = driver.new_run(seed=1, width=WIDE)
            result = driver.fit(run, backup_dir, epochs=4, on_write_error="warn")
        assert result.error is None and result.epochs_run == [2, 3]
        assert caplog.text.count("Backup skipped") == 2  # after epochs 2 and 3
