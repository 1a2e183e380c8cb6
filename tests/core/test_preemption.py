import os
import signal
import subprocess
import sys
import threading

import pytest

from unified_backup import BackupError, InvalidArgumentError, SingleProcess, UnsupportedEnvironmentError
from unified_backup.preemption import EXIT_PREEMPTED, PreemptionWatch, TrainingPreempted, parse_signals


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
