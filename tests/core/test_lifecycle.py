import datetime
import json
import logging
import os
import re
import signal
import threading

import pytest

from tests.lock_probe import lock_is_free
from unified_backup import (
    BackupError,
    BackupOptions,
    BackupWriteError,
    CorruptBackupError,
    Counters,
    IncompatibleBackupError,
    Lifecycle,
    NoBackupError,
    Position,
    Slot,
    UnsupportedEnvironmentError,
    UnsupportedFormatError,
)
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import PreemptionWatch, TrainingPreempted

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
    assert lock_is_free(committed)
    assert (committed / LOCK_NAME).exists()  # the mark the crashed run left stays: nothing changed


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


def test_leftover_staging_is_removed_at_start_logged_at_info(committed, caplog):
    orphan = Slot(committed).stage()
    (orphan / "weights.bin").write_bytes(b"half")
    with caplog.at_level(logging.INFO):
        manifest = Lifecycle(BackupOptions(committed)).start(FakeState())
    assert not orphan.exists() and manifest.epoch == 2
    (record,) = [r for r in caplog.records if "incomplete backup" in r.getMessage()]
    assert record.levelno == logging.INFO


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
    assert lifecycle.boundary(Position.epoch_end(3, 24)) is None  # the same step, but no epoch end
    assert lifecycle.stats.backups == 1
    lifecycle.finish(success=True)


def test_a_failed_open_or_restore_releases_the_folder_and_the_signal_handlers(committed):
    before = signal.getsignal(signal.SIGUSR1)
    lifecycle, state = Lifecycle(BackupOptions(committed)), FakeState(shape="float32[8]")
    assert lifecycle.open(state).epoch == 2
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    lifecycle.watch(watch)  # as Keras does before a restore deferred to the first step
    with pytest.raises(IncompatibleBackupError):
        lifecycle.restore()
    assert signal.getsignal(signal.SIGUSR1) == before and lock_is_free(committed)
    assert not lifecycle.running and Slot(committed).read_manifest().epoch == 2


def test_a_backup_opened_but_never_restored_is_not_deleted_on_success(committed, caplog):
    lifecycle = Lifecycle(BackupOptions(committed))
    assert lifecycle.open(FakeState()).epoch == 2  # e.g. an unbuilt Keras model with nothing to train
    assert lifecycle.boundary(Position.epoch_end(3, 24), epoch_end=True) is None  # it never trained
    with caplog.at_level(logging.WARNING):
        lifecycle.finish(success=True)
    assert "Kept the backup" in caplog.text and Slot(committed).read_manifest().epoch == 2
    assert not (committed / LOCK_NAME).exists()


def test_a_failed_backup_at_a_preemption_stop_still_releases_everything(committed):
    before = signal.getsignal(signal.SIGUSR1)
    lifecycle, state = Lifecycle(BackupOptions(committed, save_before_preemption=["SIGUSR1"])), FakeState()
    lifecycle.start(state)
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    lifecycle.watch(watch)
    state.failure = OSError(28, "No space left on device")
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(BackupWriteError, match="still committed and intact"):
        lifecycle.boundary(Position(2, 3, 19, 3))
    assert signal.getsignal(signal.SIGUSR1) == before and lock_is_free(committed)
    assert (committed / LOCK_NAME).exists()  # a run that stopped: its mark stays
    assert not lifecycle.running and Slot(committed).read_manifest().epoch == 2


def test_with_warn_a_failed_backup_is_tried_again_when_a_signal_stops_at_that_step(committed, caplog):
    options = BackupOptions(committed, save_freq=3, on_write_error="warn", save_before_preemption=["SIGUSR1"])
    lifecycle, state = Lifecycle(options), FakeState()
    lifecycle.start(state)
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    lifecycle.watch(watch)
    state.failure = OSError(28, "No space left on device")
    assert lifecycle.boundary(Position(2, 3, 19, 3)) is None  # due, failed, training goes on
    state.failure = None
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(TrainingPreempted, match="backed up global step 19 "):
        lifecycle.boundary(Position(2, 3, 19, 3))
    assert Slot(committed).read_manifest().global_step == 19


class Rank1:
    """The collectives as the second process of a two-process training sees them, scripted."""

    is_primary = False
    rank = 0 + 1

    def __init__(self, broadcasts: list, gathers: list) -> None:
        self.broadcasts, self.gathers = broadcasts, gathers

    def barrier(self, name):
        return None

    def broadcast(self, value):
        return self.broadcasts.pop(0)

    def any(self, flag):
        return flag

    def gather(self, value):
        return [self.gathers.pop(0), value]


def report(cls: str, message: str, errno: int | None = None, os_error: bool = False, rank: int = 0) -> dict:
    """What a failing process tells the others (``Coordinator.gather`` / ``broadcast``)."""
    return {
        "class": cls,
        "os": os_error or errno is not None,
        "errno": errno,
        "message": message,
        "rank": rank,
    }


def test_another_process_raises_the_class_of_the_primarys_error(committed):
    rank1 = Rank1(broadcasts=[{"error": report("IncompatibleBackupError", "model/w differs")}], gathers=[])
    with pytest.raises(IncompatibleBackupError, match="model/w differs"):
        Lifecycle(BackupOptions(committed)).open(FakeState(), rank1)
    chosen = {"manifest": None, "refused": None}
    full = report("OSError", "No space left on device", errno=28)
    rank1 = Rank1(
        broadcasts=[{"value": chosen}, {"value": None}, {"value": str(committed / "x")}], gathers=[full]
    )
    lifecycle = Lifecycle(BackupOptions(committed, on_write_error="warn"))
    lifecycle.start(FakeState(), rank1)
    assert lifecycle.boundary(Position.epoch_end(3, 24), epoch_end=True) is None  # skipped, as on rank 0
    assert not (committed / "x.worker-1").exists()  # its scratch files are removed
    no_errno = report("Error", "copy failed", os_error=True)  # e.g. shutil.Error: an OSError without errno
    rank1.broadcasts.append({"value": str(committed / "y")})
    rank1.gathers.append(no_errno)
    assert lifecycle.boundary(Position.epoch_end(4, 32), epoch_end=True) is None  # a write error all the same
    rank1.broadcasts.append({"value": str(committed / "z")})
    rank1.gathers.append(report("RuntimeError", "pickling failed"))
    with pytest.raises(BackupError, match="RuntimeError on process 0: pickling failed"):
        lifecycle.boundary(Position.epoch_end(5, 40), epoch_end=True)  # not a write error: no rank goes on


def test_every_epoch_end_backs_up_even_when_no_optimizer_step_was_taken(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), FakeState()
    lifecycle.start(state)
    assert lifecycle.boundary(Position.epoch_end(1, 0), epoch_end=True).counters == Counters(1, 0, 0)
    assert lifecycle.boundary(Position.epoch_end(2, 0), epoch_end=True).counters == Counters(2, 0, 0)
    lifecycle.finish(success=False)


def test_the_manifest_records_the_topology_and_another_shape_restores_with_a_warning(backup_dir, caplog):
    made = {"strategy": "MultiWorkerMirrored", "workers": 2, "replicas": 2}
    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), FakeState(b"two")
    state.topology = made
    lifecycle.start(state)
    assert epoch_end(lifecycle, state, b"two", Counters(1, 0, 8)).topology == made
    lifecycle.finish(success=False)
    assert json.loads((backup_dir / "manifest.json").read_text())["topology"] == made

    same = FakeState()  # the same workers and replicas under another name: nothing differs
    same.topology = dict(made, strategy="SomeOtherName", cluster={"chief": 1, "worker": 1})
    with caplog.at_level(logging.WARNING):
        lifecycle = Lifecycle(BackupOptions(backup_dir))
        lifecycle.start(same)
    assert same.weights == b"two" and "another shape" not in caplog.text
    lifecycle.finish(success=False)

    other = FakeState()
    other.topology = {"strategy": "Mirrored", "workers": 1, "replicas": 2}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lifecycle = Lifecycle(BackupOptions(backup_dir))
        lifecycle.start(other)
    assert other.weights == b"two"  # replicated state: restored as it is
    made_text = "made by a job of another shape (replicas=2, strategy=MultiWorkerMirrored, workers=2)"
    assert made_text in caplog.text
    assert "this one (replicas=2, strategy=Mirrored, workers=1)" in caplog.text
    lifecycle.finish(success=False)

    unknown = FakeState()  # a state that reports no topology (or an old manifest): nothing to compare
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Lifecycle(BackupOptions(backup_dir)).start(unknown)
    assert "another shape" not in caplog.text


def test_a_users_file_named_like_the_previous_record_is_refused_at_start_and_kept(committed):
    users = committed / "manifest.previous.json"
    users.write_text('{"format": "my-dataset"}')
    before = sorted(p.name for p in committed.rglob("*"))
    lifecycle = Lifecycle(BackupOptions(committed))  # keep_previous=False: a previous record would go
    with pytest.raises(UnsupportedFormatError, match=r"previous.json is not a unified-backup manifest"):
        lifecycle.start(FakeState(b"fresh"))
    assert users.read_text() == '{"format": "my-dataset"}'
    assert sorted(p.name for p in committed.rglob("*")) == before


def test_resume_required_raises_naming_the_folder_and_changes_nothing(backup_dir, tmp_path):
    lifecycle = Lifecycle(BackupOptions(backup_dir, resume="required"))
    with pytest.raises(NoBackupError, match=r"resume='required', but .*backup holds no backup to restore\. "):
        lifecycle.start(FakeState())
    assert not lifecycle.running and not backup_dir.exists()  # the folder it made for the lock is gone


def test_resume_required_restores_when_there_is_a_backup(committed):
    assert Lifecycle(BackupOptions(committed, resume="required")).start(FakeState()).epoch == 2


def test_a_restart_that_finds_no_backup_warns_and_says_why(backup_dir, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    first = Lifecycle(BackupOptions(backup_dir))
    first.start(FakeState())
    first.finish(success=False)  # stopped before its first backup point: only its lock file stays
    assert sorted(p.name for p in backup_dir.iterdir()) == [".unified-backup-created", LOCK_NAME]
    with caplog.at_level(logging.WARNING):
        second = Lifecycle(BackupOptions(backup_dir))
        assert second.start(FakeState()) is None
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "Training starts from scratch" in warning.getMessage()
    assert f"a run that did not finish left its lock file: pid {os.getpid()}" in warning.getMessage()
    second.finish(success=True)
    caplog.clear()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the scheduler says so, with no mark on disk
    with caplog.at_level(logging.WARNING):
        third = Lifecycle(BackupOptions(backup_dir))
        third.start(FakeState())
    assert "looks like a restart (SLURM_RESTART_COUNT=2)" in caplog.text
    third.finish(success=True)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a first run: no sign, no warning
        fourth = Lifecycle(BackupOptions(backup_dir))
        fourth.start(FakeState())
        fourth.finish(success=True)
    assert not caplog.records
    first.start(FakeState())
    first.finish(success=False)
    mark = b'{"pid": 1, "host": "gone", "since": "2026-01-01T00:00:00+00:00"}'  # another host's run
    (backup_dir / LOCK_NAME).write_bytes(mark)
    with pytest.raises(NoBackupError, match=r"\(a run that did not finish left its lock file: pid 1 on gone"):
        Lifecycle(BackupOptions(backup_dir, resume="required")).start(FakeState())
    assert (backup_dir / LOCK_NAME).read_bytes() == mark  # refused: the mark names the unfinished run still


def test_every_restore_is_announced_once_in_one_line_unless_verbose_is_off(committed, caplog):
    lines = []
    lifecycle = Lifecycle(BackupOptions(committed), announce=lines.append)
    with caplog.at_level(logging.INFO):
        lifecycle.start(FakeState())
    (line,) = lines
    assert re.fullmatch(
        rf"Resumed from {re.escape(str(committed))}: 2 epoch\(s\) done, step 0 of the next \(global step "
        r"16\); written \d+ s ago by fake 1\.0\.",
        line,
    ), line
    assert line in caplog.text  # and logged at INFO, for log files
    lifecycle.finish(success=False)
    quiet = []
    Lifecycle(BackupOptions(committed, verbose=False), announce=quiet.append).start(FakeState())
    assert quiet == []


def test_the_age_of_a_backup_reads_well_whatever_its_clock():
    from unified_backup.lifecycle import _age

    now = datetime.datetime.now(datetime.timezone.utc)
    assert _age((now - datetime.timedelta(minutes=2, seconds=5)).isoformat()) == "2 min ago"
    assert _age((now - datetime.timedelta(days=3)).isoformat()) == "3 days ago"
    naive = (now - datetime.timedelta(hours=5)).replace(tzinfo=None)  # read as UTC
    assert _age(naive.isoformat()) == "5 h ago"
    assert _age((now + datetime.timedelta(seconds=20)).isoformat()) == "0 s ago"  # a little skew
    ahead = (now + datetime.timedelta(hours=1)).isoformat(timespec="seconds")
    assert _age(ahead) == f"at {ahead}" and _age("yesterday") == "at yesterday"


def test_another_process_rebuilds_a_no_backup_error_with_its_message_only():
    from unified_backup.lifecycle import _raised, _report

    error = _raised(_report(NoBackupError("resume='required', but backup/ holds no backup"), 0), None, 1)
    assert isinstance(error, NoBackupError) and str(error) == "resume='required', but backup/ holds no backup"


class Threads:
    """Coordinators for ``size`` threads that stand for the processes of one training: real
    collectives, through a shared board and a barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size)
        self._board: list = [None] * size

    def member(self, rank: int) -> "ThreadMember":
        return ThreadMember(self, rank)

    def exchange(self, rank: int, value):
        self._board[rank] = value
        self._barrier.wait(timeout=30)
        values = list(self._board)
        self._barrier.wait(timeout=30)  # nobody writes the next value before all have read this one
        return values


class ThreadMember:
    def __init__(self, group: Threads, rank: int) -> None:
        self.group, self.rank, self.is_primary = group, rank, rank == 0

    def barrier(self, name):
        self.group.exchange(self.rank, name)

    def broadcast(self, value):
        return self.group.exchange(self.rank, value)[0]

    def any(self, flag):
        return any(self.group.exchange(self.rank, flag))

    def gather(self, value):
        return self.group.exchange(self.rank, value)


class ShardedState(FakeState):
    """Each process holds its own part of the weights and writes it as ``shard-<rank>.bin``."""

    sharded = True

    def save(self, directory, position, coordinator):
        (directory / f"shard-{coordinator.rank}.bin").write_bytes(self.weights)

    def load(self, directory, manifest, coordinator):
        self.weights = (directory / f"shard-{coordinator.rank}.bin").read_bytes()
        self.loads += 1


def on_threads(size: int, run) -> list:
    """``run(rank, coordinator)`` on ``size`` threads at once; what each returned or raised."""
    group, results = Threads(size), [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = run(rank, group.member(rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_a_sharded_state_is_written_by_every_process_into_one_commit_and_verified_before_any_loads(
    backup_dir,
):
    def train(rank, coordinator):
        lifecycle, state = Lifecycle(BackupOptions(backup_dir)), ShardedState()
        lifecycle.start(state, coordinator)
        manifest = epoch_end(lifecycle, state, f"part {rank}".encode(), Counters(1, 0, 8))
        lifecycle.finish(success=False)
        return manifest

    manifests = on_threads(2, train)
    assert manifests[0] == manifests[1] and sorted(manifests[0].files) == ["shard-0.bin", "shard-1.bin"]
    assert [p.name for p in backup_dir.iterdir() if p.is_dir()] == [manifests[0].payload]  # no scratch

    def resume(rank, coordinator):
        state, lifecycle = ShardedState(), Lifecycle(BackupOptions(backup_dir))
        try:
            lifecycle.start(state, coordinator)
        finally:
            lifecycle.finish(success=False)
        return state

    assert [state.weights for state in on_threads(2, resume)] == [b"part 0", b"part 1"]
    shard = Slot(backup_dir).payload_dir(manifests[0]) / "shard-1.bin"
    shard.write_bytes(b"part 9")  # same size, other bytes
    refused = on_threads(2, resume)
    assert all(isinstance(error, CorruptBackupError) and "shard-1.bin" in str(error) for error in refused)


def test_a_process_that_does_not_see_the_primarys_staging_folder_stops_every_process(committed):
    """Sharded state on a backup_dir that is not shared: rank 1 would write where no one commits."""
    elsewhere = committed / "payload-20260101T000000-0000abcd"  # as rank 0 made it, not seen here
    chosen = {"manifest": None, "refused": None}
    rank1 = Rank1(broadcasts=[{"value": chosen}, {"value": None}, {"value": str(elsewhere)}], gathers=[None])
    lifecycle = Lifecycle(BackupOptions(committed))
    lifecycle.start(ShardedState(), rank1)
    with pytest.raises(UnsupportedEnvironmentError, match="filesystem every process sees"):
        lifecycle.boundary(Position.epoch_end(3, 24), epoch_end=True)
    assert not elsewhere.exists()  # no local copy made


class LaidOutState(FakeState):
    def __init__(self, layout: str | None) -> None:
        super().__init__()
        self.topology = {"strategy": "S", "workers": 1, "replicas": 1} | (
            {"layout": layout} if layout else {}
        )


def test_a_backup_of_another_layout_is_refused_before_anything_loads(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), LaidOutState("sharded")
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"shards", Counters(1, 0, 8))
    lifecycle.finish(success=False)
    replicated = LaidOutState("replicated")
    with pytest.raises(
        IncompatibleBackupError, match="holds sharded state .* loads replicated state, so nothing"
    ):
        Lifecycle(BackupOptions(backup_dir)).start(replicated)
    assert replicated.loads == 0 and Slot(backup_dir).read_manifest().topology["layout"] == "sharded"
    unrecorded = LaidOutState(None)  # a state that records no layout (Keras) is not compared
    lifecycle = Lifecycle(BackupOptions(backup_dir))
    lifecycle.start(unrecorded)
    lifecycle.finish(success=False)
    assert unrecorded.loads == 1
    sharded = LaidOutState("sharded")
    Lifecycle(BackupOptions(backup_dir)).start(sharded)
    assert sharded.loads == 1


def test_stats_time_the_restore_of_a_backup_and_only_then(committed):
    lifecycle = Lifecycle(BackupOptions(committed))
    lifecycle.start(FakeState())
    assert 0 < lifecycle.stats.restore_seconds < 60 and lifecycle.stats.backups == 0
    lifecycle.finish(success=True)
    lifecycle.start(FakeState())  # nothing left to restore
    assert lifecycle.stats.restore_seconds == 0.0
    lifecycle.finish(success=True)
