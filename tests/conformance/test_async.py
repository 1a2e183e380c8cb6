"""``async_backup=True``: the same backups as synchronous ones, written by a background thread.

The write of each backup is slowed down here (the snapshot's write call sleeps first), so that
training runs many steps while the backup is being written: a snapshot that shared memory with the
live state, or a lifecycle that did not wait for the writer, would commit another state than the
one at the backup point, and the resumed run would not end bit-identical.
"""

from __future__ import annotations

import logging
import time

import pytest

from unified_backup import BackupWriteError

from ..faults import fill, tmpfs
from .driver import STEPS_PER_EPOCH
from .test_exact import EPOCHS, THREE, assert_identical
from .test_faults import committed

WRITE_DELAY = 0.3  # seconds each background write waits before it starts: many steps at this size


@pytest.fixture
def slow_writes(driver, monkeypatch):
    """Delay every background write by ``WRITE_DELAY`` (the real write follows); count them."""
    if driver.name == "lightning":
        from lightning_impl.state import LightningState as cls
    else:
        from keras_impl.state import KerasTrainingState as cls
    original = cls.snapshot
    writes: list[float] = []

    def snapshot(self, position, coordinator):
        write = original(self, position, coordinator)

        def slow(directory):
            time.sleep(WRITE_DELAY)
            writes.append(time.monotonic())
            return write(directory)

        return slow

    monkeypatch.setattr(cls, "snapshot", snapshot)
    return writes


@pytest.mark.parametrize("save_freq", ["epoch", 5], ids=["per-epoch", "every-5-steps"])
def test_async_backups_resume_bit_identical_while_training_outruns_the_writer(
    driver, tmp_path, slow_writes, save_freq
):
    options = {"shuffle": True, "dropout": 0.2}
    reference = driver.new_run(seed=0, **options)
    ref = driver.fit(reference, tmp_path / "reference", epochs=EPOCHS, save_freq=save_freq)
    assert ref.error is None
    backup_dir = tmp_path / "backup"
    losses: dict[int, float] = {}
    for k, point in enumerate([*THREE, None]):
        run = driver.new_run(seed=k, **options)
        result = driver.fit(
            run, backup_dir, epochs=EPOCHS, save_freq=save_freq, interrupt=point, async_backup=True
        )
        losses.update(result.losses)
        if point is not None:
            assert isinstance(result.error, RuntimeError) and "interrupt" in str(result.error)
            manifest = committed(backup_dir)  # fit ended after the write in flight was committed
            assert manifest.global_step > 0
    assert result.error is None, repr(result.error)
    assert slow_writes, "no backup was written in the background"
    assert result.global_step == ref.global_step
    assert_identical(driver.weights(run), driver.weights(reference), "weights")
    assert_identical(driver.optimizer_state(run), driver.optimizer_state(reference), "optimizer state")
    assert losses == ref.losses
    assert not backup_dir.exists()


def test_fit_waits_for_the_last_write_before_it_returns(driver, tmp_path, slow_writes):
    backup_dir = tmp_path / "backup"
    result = driver.fit(
        driver.new_run(), backup_dir, epochs=2, save_freq=3, async_backup=True, delete_checkpoint=False
    )
    assert result.error is None
    manifest = committed(backup_dir)
    assert manifest.global_step == 2 * STEPS_PER_EPOCH - 1  # the last due backup (step 15), committed
    assert len(slow_writes) == 5  # steps 3, 6, 9, 12, 15


def test_async_disk_full_stops_training_at_the_next_backup_point(driver, tmp_path):
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "backup"
        driver.fit(driver.new_run(), backup_dir, epochs=4, interrupt=(2, 1))
        before = committed(backup_dir)
        fill(mount)
        result = driver.fit(driver.new_run(seed=1), backup_dir, epochs=5, async_backup=True)
        assert isinstance(result.error, BackupWriteError), repr(result.error)
        message = str(result.error)
        assert "No space left on device" in message and "still committed and intact" in message
        # The backup of epoch 2 failed in the background; the error surfaced at epoch 3's backup point,
        # before epoch 4 trained.
        assert result.global_step == 4 * STEPS_PER_EPOCH
        assert committed(backup_dir) == before


def test_async_disk_full_with_warn_trains_to_the_end(driver, tmp_path, caplog):
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "backup"
        driver.fit(driver.new_run(), backup_dir, epochs=4, interrupt=(2, 1))
        fill(mount)
        with caplog.at_level(logging.WARNING):
            result = driver.fit(
                driver.new_run(seed=1), backup_dir, epochs=4, on_write_error="warn", async_backup=True
            )
        assert result.error is None and result.epochs_run == [2, 3]
        assert caplog.text.count("Backup skipped") == 2  # epoch 2's at epoch 3's point; epoch 3's at the end
        assert not backup_dir.exists()  # fit ended well: deleted
