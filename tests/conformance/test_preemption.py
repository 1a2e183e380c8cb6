"""Preemption: a signal makes the run back up its step, stop with exit code 143, and resume exactly."""

from __future__ import annotations

import json
import signal

import pytest

from tests.harness import Worker
from unified_backup import Slot
from unified_backup.preemption import EXIT_PREEMPTED


@pytest.mark.parametrize(
    ("sig", "save_freq", "async_backup"),
    [
        (signal.SIGTERM, "epoch", False),
        (signal.SIGUSR1, "epoch", False),
        (signal.SIGTERM, False, False),
        (
            signal.SIGTERM,
            5,
            True,
        ),  # the preemption backup waits for the write in flight, then is written at once
    ],
    ids=["SIGTERM", "SIGUSR1", "SIGTERM-save_freq=False", "SIGTERM-async_backup"],
)
def test_signal_backs_up_the_step_stops_and_resumes_exactly(driver, tmp_path, sig, save_freq, async_backup):
    def command(backup_dir, out, batch_sleep, preemption=()):
        return driver.demo_command(
            backup_dir, out, epochs=3, batch_sleep=batch_sleep, exact=True, preemption=preemption,
            save_freq=save_freq, async_backup=async_backup,
        )  # fmt: skip

    assert Worker(command(tmp_path / "reference", tmp_path / "reference.json", 0.0)).finish(300) == 0
    backup_dir = tmp_path / "backup"
    victim = Worker(command(backup_dir, tmp_path / "out.json", 0.05, preemption=("SIGTERM", sig.name)))
    assert victim.wait_event("epoch", 300) is not None, victim.failure()
    victim.wait_event("never", 0.2)  # inside epoch 1
    if save_freq is False:  # no periodic backup: the signal's is the first
        assert Slot(backup_dir).read_manifest() is None
    victim.proc.send_signal(sig)
    assert victim.finish(120) == EXIT_PREEMPTED, victim.failure()
    log = "".join(victim.stderr)
    assert sig.name in log and "exit code 143" in log, log
    manifest = Slot(backup_dir).read_manifest()
    assert (
        manifest is not None and manifest.epoch == 1 and manifest.step_in_epoch > 0
    )  # the step, not the epoch
    survivor = Worker(command(backup_dir, tmp_path / "out.json", 0.0))
    assert survivor.finish(300) == 0, survivor.failure()
    assert survivor.wait_event("start", 0)["global_step"] == manifest.global_step
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
    assert not backup_dir.exists()
