"""The resume contract (README: "The contract in brief"), one scenario at a time, for every adapter alike."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.harness import Worker
from unified_backup import InvalidArgumentError, Slot
from unified_backup.lock import LOCK_NAME

from .driver import STEPS_PER_EPOCH


def assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def reference(driver, epochs, tmp_path):
    run = driver.new_run(seed=0)
    result = driver.fit(run, tmp_path / "reference", epochs=epochs)
    assert result.error is None
    return driver.weights(run)


def interrupted_backup(driver, backup_dir, epoch=2, batch=3, **run_args):
    run = driver.new_run(seed=0, **run_args)
    result = driver.fit(run, backup_dir, epochs=4, interrupt=(epoch, batch))
    assert isinstance(result.error, RuntimeError) and "interrupt" in str(result.error)
    manifest = Slot(backup_dir).read_manifest()
    assert manifest is not None and manifest.epoch == epoch and manifest.framework == driver.name
    return manifest


def test_fresh_run_leaves_no_backup(driver, tmp_path):
    run = driver.new_run()
    result = driver.fit(run, tmp_path / "backup", epochs=3)
    assert result.error is None and result.epochs_run == [0, 1, 2]
    assert result.global_step == 3 * STEPS_PER_EPOCH
    assert not (tmp_path / "backup").exists()


def test_a_folder_that_existed_before_fit_is_kept_empty(driver, tmp_path):
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    result = driver.fit(driver.new_run(), backup_dir, epochs=2)
    assert result.error is None
    assert backup_dir.is_dir() and not any(backup_dir.iterdir())  # only what the library wrote is gone


def test_save_freq_false_makes_no_periodic_backup(driver, tmp_path, caplog):
    backup_dir = tmp_path / "backup"
    with caplog.at_level(logging.WARNING):
        result = driver.fit(driver.new_run(), backup_dir, epochs=3, save_freq=False, interrupt=(2, 3))
    assert isinstance(result.error, RuntimeError) and "interrupt" in str(result.error)
    assert Slot(backup_dir).read_manifest() is None  # two epochs and three steps trained, nothing backed up
    assert "(save_freq=False) without save_before_preemption never backs up" in caplog.text


def test_exception_then_resume_redoes_the_epoch_and_matches_uninterrupted(driver, tmp_path):
    expected = reference(driver, 4, tmp_path)
    manifest = interrupted_backup(driver, tmp_path / "backup", epoch=2, batch=3)
    assert manifest.global_step == 2 * STEPS_PER_EPOCH and manifest.step_in_epoch == 0
    run = driver.new_run(seed=1)  # a restarted job: other initial weights, overwritten by the restore
    result = driver.fit(run, tmp_path / "backup", epochs=4)
    assert result.error is None and result.epochs_run == [2, 3]
    assert result.global_step == 4 * STEPS_PER_EPOCH  # 3 batches of epoch 2 redone, not doubled
    assert_same_weights(driver.weights(run), expected)
    assert not (tmp_path / "backup").exists()


def test_sigkill_then_resume_matches_uninterrupted(driver, tmp_path):
    argv = driver.demo_command(tmp_path / "reference", tmp_path / "reference.json", epochs=5, batch_sleep=0.0)
    assert Worker(argv).finish(300) == 0
    backup_dir = tmp_path / "backup"
    victim = Worker(driver.demo_command(backup_dir, tmp_path / "out.json", epochs=5, batch_sleep=0.05))
    assert victim.wait_event("start", 300) is not None, victim.failure()
    epochs = [victim.wait_event("epoch", 60)]
    while len([e for e in victim.events if e["event"] == "epoch"]) < 2 and victim.proc.poll() is None:
        victim.wait_event("never", 0.05)
    victim.kill()  # SIGKILL, mid-epoch 2
    assert epochs[0] is not None and victim.proc.returncode == -signal.SIGKILL
    manifest = Slot(backup_dir).read_manifest()
    assert manifest is not None and manifest.epoch >= 2
    assert (backup_dir / LOCK_NAME).exists()  # left by the killed process
    survivor = Worker(driver.demo_command(backup_dir, tmp_path / "out.json", epochs=5, batch_sleep=0.0))
    assert survivor.finish(300) == 0, survivor.failure()
    assert survivor.wait_event("start", 0)["restored_epoch"] == manifest.epoch
    assert "Taking over the lock" in "".join(survivor.stderr)
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
    assert not backup_dir.exists()


def test_crash_after_last_backup_before_delete_resumes_to_the_end(driver, tmp_path):
    expected = reference(driver, 3, tmp_path)
    run = driver.new_run(seed=0)
    result = driver.fit(run, tmp_path / "backup", epochs=3, interrupt="end")
    assert isinstance(result.error, RuntimeError)
    assert Slot(tmp_path / "backup").read_manifest().epoch == 3
    run = driver.new_run(seed=1)
    result = driver.fit(run, tmp_path / "backup", epochs=3)
    assert result.error is None and result.epochs_run == []
    assert_same_weights(driver.weights(run), expected)
    assert not (tmp_path / "backup").exists()


def test_early_stopping_is_a_success_and_deletes(driver, tmp_path):
    result = driver.fit(driver.new_run(), tmp_path / "backup", epochs=10, early_stopping=True)
    assert result.error is None and result.epochs_run == [0, 1]
    assert not (tmp_path / "backup").exists()


def test_user_files_in_backup_dir_survive_deletion(driver, tmp_path):
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    (backup_dir / "notes.txt").write_text("mine")
    result = driver.fit(driver.new_run(), backup_dir, epochs=2)
    assert result.error is None
    assert sorted(p.name for p in backup_dir.iterdir()) == ["notes.txt"]
    assert (backup_dir / "notes.txt").read_text() == "mine"


def test_second_fit_on_the_same_objects_behaves_like_a_first(driver, tmp_path):
    run, control = driver.new_run(seed=0), driver.new_run(seed=0)
    first = driver.fit(run, tmp_path / "backup", epochs=2)
    again = driver.fit(run, tmp_path / "backup", epochs=2)
    control_first = driver.fit(control, None, epochs=2)
    control_again = driver.fit(control, None, epochs=2)
    assert first.epochs_run == control_first.epochs_run == [0, 1]
    assert again.epochs_run == control_again.epochs_run
    assert again.global_step == control_again.global_step
    assert_same_weights(driver.weights(run), driver.weights(control))
    assert not (tmp_path / "backup").exists()


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from unified_backup.lock import DirectoryLock
    DirectoryLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_lock_of_a_dead_process_is_taken_over_without_alarm(driver, tmp_path, caplog):
    backup_dir = tmp_path / "backup"
    interrupted_backup(driver, backup_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(backup_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    with caplog.at_level(logging.INFO):
        result = driver.fit(driver.new_run(seed=1), backup_dir, epochs=4)
    assert result.error is None and result.epochs_run == [2, 3]
    (takeover,) = [r for r in caplog.records if "left by a run that did not finish" in r.getMessage()]
    assert f"(pid {holder.pid}" in takeover.getMessage() and takeover.levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("unified")]


def test_a_file_as_backup_dir_is_refused_before_fit_and_left_untouched(driver, tmp_path):
    file = tmp_path / "backup"
    file.write_bytes(b"not a folder")
    with pytest.raises(InvalidArgumentError, match="which is a file, not a folder"):
        driver.fit(driver.new_run(), file, epochs=1)
    assert file.read_bytes() == b"not a folder"
