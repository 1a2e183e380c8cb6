"""keep_previous=True in both adapters: a corrupt newest backup falls back to the previous one, exactly."""

from __future__ import annotations

import logging

import pytest

from unified_backup import CorruptBackupError, Slot

from .bad_inputs import largest, snapshot
from .test_contract import assert_same_weights, reference


def interrupted_with_two_backups(driver, backup_dir):
    run = driver.new_run(seed=0)
    result = driver.fit(run, backup_dir, epochs=4, interrupt=(2, 3), keep_previous=True)
    assert isinstance(result.error, RuntimeError), result.error
    slot = Slot(backup_dir, keep_previous=True)
    newest, previous = slot.read_manifest(), slot.read_previous()
    assert (newest.epoch, previous.epoch) == (2, 1)
    slot.verify(newest)
    slot.verify(previous)
    return slot, newest


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["payload", "manifest"])
def test_a_corrupt_newest_backup_resumes_from_the_previous_one_exactly(driver, tmp_path, damage, caplog):
    expected = reference(driver, 4, tmp_path)
    backup_dir = tmp_path / "backup"
    slot, newest = interrupted_with_two_backups(driver, backup_dir)
    if damage == "payload":
        flip_a_byte(slot.payload_dir(newest) / largest(newest))
    else:
        slot.manifest_path.write_text(slot.manifest_path.read_text()[:-40])
    run = driver.new_run(seed=1)
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        result = driver.fit(run, backup_dir, epochs=4, keep_previous=True)
    assert result.error is None, result.error
    assert result.epochs_run == [1, 2, 3]  # epoch 1 done in the previous backup: nothing doubled
    assert "keep_previous=True: restoring the previous backup" in caplog.text
    assert_same_weights(driver.weights(run), expected)
    assert not backup_dir.exists()


def test_without_keep_previous_the_corrupt_newest_is_refused(driver, tmp_path):
    backup_dir = tmp_path / "backup"
    slot, newest = interrupted_with_two_backups(driver, backup_dir)
    flip_a_byte(slot.payload_dir(newest) / largest(newest))
    before = snapshot(backup_dir)
    run = driver.new_run(seed=1)
    weights = driver.weights(run)
    result = driver.fit(run, backup_dir, epochs=4)
    assert isinstance(result.error, CorruptBackupError) and largest(newest) in str(result.error)
    assert_same_weights(driver.weights(run), weights)
    assert snapshot(backup_dir) == before
