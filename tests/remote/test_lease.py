"""The lease that keeps two trainings off one remote backup_dir, against real S3 and GCS servers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.core.conftest import FakeState, epoch_end
from unified_backup import BackupDirInUseError, BackupOptions, Counters, Lifecycle, NoBackupError
from unified_backup.lease import LEASE_NAME, Lease

pytestmark = pytest.mark.slow


def probe(remote, hold: float) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.remote.lease_probe",
        remote.url,
        json.dumps(remote.server.storage_options),
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([*argv, str(hold)], stdout=subprocess.PIPE, text=True, env=env)


def test_two_jobs_racing_for_the_lease_one_wins_the_other_is_refused_naming_it(remote):
    jobs = [probe(remote, hold=25), probe(remote, hold=25)]
    try:
        lines = [job.stdout.readline().strip() for job in jobs]  # the refusal comes once a renewal is seen
    finally:
        for job in jobs:
            job.kill()
            job.wait(30)
    assert sorted(line.split(":")[0] for line in lines) == ["acquired", "refused"], lines
    winner = jobs[lines.index("acquired")]
    refusal = next(line for line in lines if line.startswith("refused"))
    assert f"pid {winner.pid} on " in refusal and "renewed its lease" in refusal


def test_a_live_lease_of_another_thread_is_refused(remote):
    holder, done = Lease(remote.store), threading.Event()
    thread = threading.Thread(target=lambda: (holder.acquire(), done.wait()))  # a fit in another thread
    thread.start()
    while not holder.held:
        time.sleep(0.05)
    try:
        began = time.monotonic()
        with pytest.raises(BackupDirInUseError, match=f"pid {os.getpid()} on "):
            Lifecycle(BackupOptions(remote.url, **remote.options)).start(FakeState())
        assert time.monotonic() - began < 15  # refused at the first renewal, not after the expiry
    finally:
        done.set()
        thread.join()
        holder.release()
    assert remote.store.read(LEASE_NAME) is None


def _leave_lease(remote, **record) -> None:
    remote.store.write(
        LEASE_NAME, json.dumps({"pid": 4242, "host": "spot-vm-7", "since": "then", **record}).encode()
    )


def test_an_expired_lease_of_another_host_is_taken_over_with_a_warning(remote, caplog):
    _leave_lease(remote, boot="b", expires=time.time() - 3600)
    lifecycle = Lifecycle(BackupOptions(remote.url, **remote.options))
    with caplog.at_level(logging.WARNING):
        lifecycle.start(FakeState())
    assert "Taking over the lease" in caplog.text and "pid 4242 on spot-vm-7" in caplog.text
    lifecycle.finish(success=True)
    assert remote.store.read(LEASE_NAME) is None


def test_a_lease_no_one_renews_is_taken_over_after_watching_it(remote, caplog, monkeypatch):
    monkeypatch.setattr("unified_backup.lease.LEASE_SECONDS", 3.0)
    _leave_lease(remote, boot="b", expires=time.time() + 3600)  # a clock far ahead, or a dead owner
    lifecycle = Lifecycle(BackupOptions(remote.url, **remote.options))
    with caplog.at_level(logging.WARNING):
        lifecycle.start(FakeState())
    assert "it was not renewed for 3 s" in caplog.text
    lifecycle.finish(success=False)


def test_a_stopped_runs_lease_is_taken_over_at_once_and_counts_as_a_restart(remote, caplog):
    first = Lifecycle(BackupOptions(remote.url, **remote.options))
    first.start(FakeState())
    first.finish(success=False)  # the lease stays, marked stopped
    assert json.loads(remote.store.read(LEASE_NAME))["stopped"] is True
    second = Lifecycle(BackupOptions(remote.url, resume="required", **remote.options))
    with pytest.raises(NoBackupError, match="a run that did not finish left its lock file: pid"):
        second.start(FakeState())  # nothing to restore, and the lease says a run stopped
    assert json.loads(remote.store.read(LEASE_NAME))["stopped"] is True  # a refused start leaves it


def test_a_job_whose_lease_was_taken_over_commits_nothing(remote):
    lifecycle, state = Lifecycle(BackupOptions(remote.url, **remote.options)), FakeState()
    lifecycle.start(state)
    committed = epoch_end(lifecycle, state, b"epoch-1", Counters(1, 0, 8))
    _leave_lease(remote, boot="b", expires=time.time() + 30)  # another job took it over
    with pytest.raises(BackupDirInUseError, match="its lease was taken over by pid 4242 on spot-vm-7"):
        epoch_end(lifecycle, state, b"epoch-2", Counters(2, 0, 16))
    assert {name.split("/")[0] for name in remote.objects()} == {"manifest.json", committed.payload}
    lifecycle.finish(success=False)
    assert json.loads(remote.store.read(LEASE_NAME))["pid"] == 4242  # the new owner's lease stays


def test_a_job_whose_lease_was_taken_over_does_not_delete_at_the_end(remote, caplog):
    lifecycle, state = Lifecycle(BackupOptions(remote.url, **remote.options)), FakeState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"epoch-1", Counters(1, 0, 8))
    _leave_lease(remote, boot="b", expires=time.time() + 30)  # another job took it over
    with caplog.at_level(logging.ERROR):
        lifecycle.finish(success=True)
    assert "the backup in" in caplog.text and "is kept" in caplog.text
    assert "manifest.json" in remote.objects()  # the other job's slot is left alone


def test_the_same_callback_after_a_stopped_fit_takes_its_lease_back_as_a_restart(remote, caplog):
    lifecycle = Lifecycle(BackupOptions(remote.url, **remote.options))
    lifecycle.start(FakeState())
    lifecycle.finish(success=False)  # e.g. a Keras fit that raised, then fit again with the same callback
    with caplog.at_level(logging.WARNING):
        lifecycle.start(FakeState())
    assert "a run that did not finish left its lock file: pid" in caplog.text
    assert "stopped" not in json.loads(remote.store.read(LEASE_NAME))  # held again, not a stopped mark
    lifecycle.finish(success=True)
    assert remote.store.read(LEASE_NAME) is None
