import os
import signal
import subprocess
import sys
import threading

import pytest

from tests.lock_probe import lock_is_free
from unified_backup import (
    BackupError,
    BackupOptions,
    InvalidArgumentError,
    Lifecycle,
    Position,
    SingleProcess,
    Slot,
    UnsupportedEnvironmentError,
)
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import EXIT_PREEMPTED, PreemptionWatch, TrainingPreempted, cause, parse_signals

from .conftest import FakeState


def test_signals_are_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch(parse_signals(["SIGUSR1", signal.SIGUSR2]))
    watch.install()
    try:
        assert not watch.agreed(SingleProcess())
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1 and watch.agreed(SingleProcess())
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_previous_python_handler_still_runs():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        watch.uninstall()
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [signal.SIGUSR1] and watch.received == signal.SIGUSR1


def test_parse_signals():
    assert parse_signals(True) == (signal.SIGTERM,)
    assert parse_signals(False) == ()
    with pytest.raises(InvalidArgumentError, match="SIGUSR1"):
        parse_signals(["SIGNOPE"])


def test_outside_the_main_thread_it_raises_instead_of_staying_off():
    errors = []
    thread = threading.Thread(target=lambda: _try(errors))
    thread.start()
    thread.join()
    assert isinstance(errors[0], UnsupportedEnvironmentError) and "main thread" in str(errors[0])


def _try(errors):
    try:
        PreemptionWatch([signal.SIGTERM]).install()
    except BackupError as exc:
        errors.append(exc)


def test_uncaught_preemption_exits_with_the_documented_code():
    code = "from unified_backup.preemption import TrainingPreempted\nraise TrainingPreempted('stopped')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == EXIT_PREEMPTED == 143 and result.stderr == ""
    assert isinstance(TrainingPreempted("x"), BackupError)


def test_the_lifecycle_backs_up_the_signalled_step_once_stops_and_releases_everything(tmp_path, caplog):
    before = signal.getsignal(signal.SIGUSR1)
    lifecycle, state = Lifecycle(BackupOptions(tmp_path, save_freq=2)), FakeState()
    lifecycle.start(state)
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    lifecycle.watch(watch)
    assert lifecycle.boundary(Position(0, 1, 1, 1)) is None
    assert lifecycle.boundary(Position(0, 2, 2, 2)).global_step == 2  # due
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(TrainingPreempted) as stopped:
        lifecycle.boundary(Position(0, 3, 3, 3))
    assert str(stopped.value) == (
        f"Preempted by SIGUSR1: backed up global step 3 (0 epoch(s) done, 3 step(s) into the next) to "
        f"{tmp_path} and stopped training; exit code 143 (TrainingPreempted). Run the same training again "
        "to resume from there."
    )
    assert stopped.value.code == EXIT_PREEMPTED and caplog.text.count("Preempted by SIGUSR1") == 1
    assert Slot(tmp_path).read_manifest().global_step == 3 and lifecycle.stats.backups == 2
    assert signal.getsignal(signal.SIGUSR1) == before and lock_is_free(tmp_path)
    assert (tmp_path / LOCK_NAME).exists()  # stopped early: the mark of a run that did not finish stays
    assert not lifecycle.running


def test_a_step_already_backed_up_is_not_written_again_on_a_signal(tmp_path):
    lifecycle, state = Lifecycle(BackupOptions(tmp_path, save_freq=2)), FakeState()
    lifecycle.start(state)
    watch = PreemptionWatch([signal.SIGUSR1])
    watch.install()
    lifecycle.watch(watch)
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(TrainingPreempted, match="backed up global step 2 "):
        lifecycle.boundary(Position(0, 2, 2, 2))  # due and signalled: one backup
    assert lifecycle.stats.backups == 1


def test_the_cause_names_the_ranks_that_received_a_signal():
    assert cause(["SIGTERM"]) == "SIGTERM"
    assert cause([None, "SIGTERM"]) == "SIGTERM (received by rank 1)"
    assert cause(["SIGUSR1", "SIGTERM"]) == "SIGTERM and SIGUSR1 (received by rank 0, 1)"
