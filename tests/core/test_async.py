"""``async_backup``: the lifecycle's background writer, with real threads and real files.

The state's write waits on an event the test sets, so the test decides when the background write
runs relative to training.
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import pytest

from unified_backup import (
    BackupOptions,
    BackupWriteError,
    Counters,
    InvalidArgumentError,
    Lifecycle,
    Position,
    Slot,
    UnsupportedEnvironmentError,
)

from .conftest import FakeState, epoch_end


class SnapshotState(FakeState):
    """A FakeState whose snapshot copies the weights; its writes wait for ``go`` and are logged."""

    def __init__(self, weights: bytes = b"w0") -> None:
        super().__init__(weights)
        self.go = threading.Event()
        self.go.set()
        self.events: list[str] = []

    def snapshot(self, position, coordinator):
        weights, failure = self.weights, self.failure  # copied now: bytes do not change
        self.events.append(f"snapshot {position.global_step}")

        def write(directory: Path) -> None:
            assert self.go.wait(30), "the test never let the write run"
            self.events.append(f"write {position.global_step}")
            (directory / "weights.bin").write_bytes(weights if failure is None else b"partial")
            if failure is not None:
                raise failure

        return write


def committed_weights(backup_dir: Path) -> bytes:
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    slot.verify(manifest)
    return (slot.payload_dir(manifest) / "weights.bin").read_bytes()


def step(lifecycle: Lifecycle, state: SnapshotState, weights: bytes, global_step: int) -> None:
    state.weights, state.global_step = weights, global_step
    lifecycle.boundary(Position(0, global_step, global_step, global_step))


def test_training_goes_on_while_the_snapshot_is_written_and_later_changes_do_not_reach_it(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, save_freq=1, async_backup=True)), SnapshotState()
    lifecycle.start(state)
    state.go.clear()
    step(lifecycle, state, b"step 1", 1)  # returns with the write still waiting
    assert state.events == ["snapshot 1"] and Slot(backup_dir).read_manifest() is None
    state.weights = b"changed by step 2"  # training goes on
    state.go.set()
    lifecycle.finish(success=False)  # waits for the write
    assert committed_weights(backup_dir) == b"step 1"
    assert lifecycle.stats.backups == 1 and lifecycle.stats.writer_seconds > 0


def test_the_first_write_is_committed_before_the_next_snapshot(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, save_freq=1, async_backup=True)), SnapshotState()
    lifecycle.start(state)
    state.go.clear()
    threading.Timer(0.3, state.go.set).start()
    step(lifecycle, state, b"step 1", 1)
    step(lifecycle, state, b"step 2", 2)  # waits for the write of step 1, released by the timer
    assert state.events[:3] == ["snapshot 1", "write 1", "snapshot 2"]  # one write at a time
    lifecycle.finish(success=False)
    assert committed_weights(backup_dir) == b"step 2"


def second_write_fails(backup_dir: Path) -> tuple[Lifecycle, SnapshotState]:
    """A fit that committed step 1 and whose background write of step 2 fails with a full disk."""
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, save_freq=1, async_backup=True)), SnapshotState()
    lifecycle.start(state)
    step(lifecycle, state, b"step 1", 1)
    state.failure = OSError(errno.ENOSPC, "No space left on device")
    step(lifecycle, state, b"step 2", 2)
    state.failure = None
    return lifecycle, state


def test_a_failed_write_raises_at_the_next_backup_point_and_the_last_backup_stays(backup_dir):
    lifecycle, state = second_write_fails(backup_dir)
    with pytest.raises(BackupWriteError, match="still committed and intact") as raised:
        step(lifecycle, state, b"step 3", 3)
    assert raised.value.errno == errno.ENOSPC and "No space left on device" in str(raised.value)
    assert state.events[-1] == "write 2"  # no snapshot of step 3 was taken
    lifecycle.finish(success=False)
    assert committed_weights(backup_dir) == b"step 1"
    assert [p.name for p in backup_dir.iterdir() if p.name.startswith("payload")] == [
        Slot(backup_dir).read_manifest().payload
    ]  # the failed staging folder was removed


def test_a_failed_write_with_warn_is_logged_and_training_goes_on(backup_dir, caplog):
    options = BackupOptions(backup_dir, save_freq=1, async_backup=True, on_write_error="warn")
    lifecycle, state = Lifecycle(options), SnapshotState()
    lifecycle.start(state)
    state.failure = OSError(errno.EIO, "Input/output error")
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        step(lifecycle, state, b"step 1", 1)
        state.failure = None
        step(lifecycle, state, b"step 2", 2)
    assert "Backup skipped" in caplog.text and "Input/output error" in caplog.text
    lifecycle.finish(success=False)
    assert committed_weights(backup_dir) == b"step 2"


def test_a_write_that_fails_as_fit_ends_raises_from_finish_and_keeps_the_backup(backup_dir):
    lifecycle, _ = second_write_fails(backup_dir)
    with pytest.raises(BackupWriteError, match="No space left on device"):
        lifecycle.finish(success=True)
    assert committed_weights(backup_dir) == b"step 1"  # not deleted: fit did not end well
    assert not lifecycle.running
    assert Lifecycle(BackupOptions(backup_dir)).start(FakeState()) is not None  # unlocked, restorable


def test_a_successful_fit_waits_for_the_writer_then_deletes(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, save_freq=1, async_backup=True)), SnapshotState()
    lifecycle.start(state)
    state.go.clear()
    step(lifecycle, state, b"step 1", 1)
    threading.Timer(0.3, state.go.set).start()
    lifecycle.finish(success=True)
    assert state.events == ["snapshot 1", "write 1"] and not backup_dir.exists()


def test_async_backup_is_refused_for_several_processes_and_for_states_without_snapshots(backup_dir):
    several = SnapshotState()
    several.topology = {"strategy": "DDP", "workers": 2, "replicas": 2}
    options = BackupOptions(backup_dir, async_backup=True)
    with pytest.raises(UnsupportedEnvironmentError, match="this training runs on 2 processes"):
        Lifecycle(options).start(several)
    with pytest.raises(UnsupportedEnvironmentError, match="takes no snapshots"):
        Lifecycle(options).start(FakeState())
    assert not backup_dir.exists()  # refused before anything was made or locked
    with pytest.raises(InvalidArgumentError, match="async_backup"):
        BackupOptions(backup_dir, async_backup="yes")  # type: ignore[arg-type]


def test_per_epoch_async_backups_restore_like_synchronous_ones(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, async_backup=True)), SnapshotState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"epoch 1", Counters(1, 0, 8))
    lifecycle.finish(success=False)
    resumed = SnapshotState(b"fresh")
    assert Lifecycle(BackupOptions(backup_dir)).start(resumed).counters == Counters(1, 0, 8)
    assert resumed.weights == b"epoch 1"


def test_a_later_fit_in_this_process_waits_for_the_earlier_ones_write_before_taking_over(backup_dir):
    """A Keras fit that raised ends no lifecycle: the next one takes its lock over, after its write."""
    earlier, state = Lifecycle(BackupOptions(backup_dir, save_freq=1, async_backup=True)), SnapshotState()
    earlier.start(state)
    state.go.clear()
    step(earlier, state, b"step 1", 1)  # the fit "raises" here, with its write in flight
    threading.Timer(0.3, state.go.set).start()
    resumed = FakeState(b"fresh")
    manifest = Lifecycle(BackupOptions(backup_dir)).start(resumed)
    assert manifest is not None and manifest.global_step == 1 and resumed.weights == b"step 1"
