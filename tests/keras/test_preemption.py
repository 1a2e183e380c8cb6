"""``save_before_preemption``: a signal backs up the step it arrived in, stops ``fit``, and resumes exactly.

In-process tests raise real signals at chosen batches; the demo worker gets real signals from outside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_impl import BackupAndRestore
from tests.harness import Worker
from tests.keras.test_callback import Interrupt, assert_same, fit, manifest_counters, new_model
from tests.lock_probe import lock_is_free
from unified_backup import Counters, Slot, UnsupportedEnvironmentError
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import EXIT_PREEMPTED, TrainingPreempted

pytestmark = pytest.mark.keras

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture
def caught():
    """Handlers for SIGTERM and SIGUSR1 that record instead of ending pytest; the watch chains to them."""
    seen: list[int] = []
    record = lambda signum, frame: seen.append(signum)  # noqa: E731
    before = {sig: signal.signal(sig, record) for sig in SIGNALS}
    yield seen, record
    for sig, handler in before.items():
        signal.signal(sig, handler)


class SendSignal(keras.callbacks.Callback):
    """Raises ``sig`` in this process at the hook ``where`` of epoch ``epoch`` (batch ``batch``)."""

    def __init__(self, where: str, epoch: int = 0, batch: int = 0, sig=signal.SIGTERM) -> None:
        super().__init__()
        self.where, self.at, self.sig, self.epoch = where, (epoch, batch), sig, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _maybe(self, where, batch=0):
        if where == self.where and (where == "train_end" or (self.epoch, batch) == self.at):
            signal.raise_signal(self.sig)  # its Python handler runs before the next bytecode

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe("batch_begin", batch)

    def on_train_batch_end(self, batch, logs=None):
        self._maybe("batch_end", batch)

    def on_epoch_end(self, epoch, logs=None):
        self._maybe("epoch_end")

    def on_train_end(self, logs=None):
        self._maybe("train_end")


def test_signal_backs_up_its_step_stops_and_the_restart_resumes_exactly(tmp_path, caught, caplog):
    seen, record = caught
    control = new_model()
    fit(control, [])
    model, callback = new_model(), BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    with caplog.at_level(logging.INFO), pytest.raises(TrainingPreempted) as stopped:
        fit(model, [SendSignal("batch_end", epoch=1, batch=4), callback])
    assert isinstance(stopped.value, SystemExit) and stopped.value.code == EXIT_PREEMPTED == 143
    assert int(model.optimizer.iterations) == 8 + 5  # no step after the one the signal came in
    assert manifest_counters(tmp_path / "b") == (1, 5, 13)
    assert seen == [signal.SIGTERM]  # the handler that was there before still ran
    assert signal.getsignal(signal.SIGTERM) is record  # restored
    assert lock_is_free(tmp_path / "b") and (tmp_path / "b" / LOCK_NAME).exists()  # released, marked
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage() == str(stopped.value)
    assert warnings[0].getMessage() == (
        f"Preempted by SIGTERM: backed up global step 13 (1 epoch(s) done, 5 step(s) into the next) "
        f"to {tmp_path / 'b'} and stopped training; exit code 143 (TrainingPreempted). "
        "Run the same training again to resume from there."
    )
    resumed = BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    assert fit(new_model(seed=7), [resumed]) == [1, 2, 3]
    assert resumed.restored.counters == Counters(1, 5, 13)
    assert_same(resumed.model, control)
    assert not (tmp_path / "b").exists() and signal.getsignal(signal.SIGTERM) is record


def test_steps_per_execution_stops_at_the_end_of_the_call_through_keras_callbacks(tmp_path, caught):
    """Three batches per call: the signal before batch 3 stops after batch 5, the call's last; Keras's
    own callbacks, before and after ours, let the exception through."""
    control = new_model(accumulate=3)
    fit(control, [])
    keras_callbacks = [
        keras.callbacks.EarlyStopping(monitor="loss", patience=5),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=5),
    ]
    model = new_model(accumulate=3)
    callback = BackupAndRestore(tmp_path / "b", save_freq=2, save_before_preemption=["SIGUSR1"])
    send = SendSignal("batch_begin", epoch=1, batch=3, sig=signal.SIGUSR1)
    with pytest.raises(TrainingPreempted, match="Preempted by SIGUSR1: backed up global step 14"):
        fit(model, [keras_callbacks[0], send, keras_callbacks[1], callback, *keras_callbacks[2:]])
    assert int(model.optimizer.iterations) == 8 + 6
    assert manifest_counters(tmp_path / "b") == (1, 6, 14)
    assert caught[0] == [signal.SIGUSR1]
    resumed = new_model(seed=7, accumulate=3)
    assert fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=2)]) == [1, 2, 3]
    assert_same(resumed, control)


@pytest.mark.parametrize("where", ["epoch_end", "train_end"])
def test_signal_after_the_last_step_of_an_epoch_or_of_fit(tmp_path, caught, where):
    """Sent at an epoch's end (e.g. in validation) or fit's: the epoch's backup is the stop's; no second."""
    model, callback = new_model(), BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    with pytest.raises(TrainingPreempted, match="global step 16 \\(2 epoch"):
        fit(model, [SendSignal(where, epoch=1), callback], epochs=2)
    assert manifest_counters(tmp_path / "b") == (2, 0, 16) and callback.stats.backups == 2
    resumed = BackupAndRestore(tmp_path / "b")
    assert fit(new_model(), [resumed], epochs=2) == []  # nothing left to train; fit ends normally
    assert resumed.restored.counters == Counters(2, 0, 16) and not (tmp_path / "b").exists()


def test_handlers_are_restored_after_fit_and_step_aside_after_a_fit_that_raised(tmp_path, caught):
    seen, record = caught
    during = []

    class Look(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            during.append(tuple(signal.getsignal(s) for s in SIGNALS))

    both = BackupAndRestore(tmp_path / "b", save_before_preemption=["SIGTERM", "SIGUSR1"])
    fit(new_model(), [both, Look()], epochs=1)
    assert all(handler is not record for handler in during[0]) and len(set(during)) == 1
    assert all(signal.getsignal(s) is record for s in SIGNALS) and seen == []
    # Keras has no hook for an exception leaving fit: the handler stays, but hands signals on.
    failed = BackupAndRestore(tmp_path / "c", save_before_preemption=["SIGUSR1"])
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(new_model(), [Interrupt(1, 2), failed])
    chained = BackupAndRestore(tmp_path / "d", save_before_preemption=["SIGUSR1"])
    with pytest.raises(TrainingPreempted):  # a later fit's handler chains to the stale one: it passes it on
        fit(new_model(), [SendSignal("batch_end", sig=signal.SIGUSR1), chained], epochs=1)
    assert seen == [signal.SIGUSR1] and manifest_counters(tmp_path / "d") == (0, 1, 1)
    assert signal.getsignal(signal.SIGUSR1) is not record  # the failed fit's, restored by the later one
    signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1, signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is record
    assert fit(new_model(), [failed], epochs=3) == [1, 2]  # it recorded nothing: its next fit runs through


def test_outside_the_main_thread_construction_and_fit_raise(tmp_path):
    errors: list[BaseException] = []
    callback = BackupAndRestore(tmp_path / "b", save_before_preemption=True)

    def in_a_thread(call):
        def run():
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    in_a_thread(lambda: BackupAndRestore("unused", save_before_preemption=True))
    in_a_thread(lambda: fit(new_model(), [callback], epochs=1))  # constructed in the main thread
    assert [type(e) for e in errors] == [UnsupportedEnvironmentError] * 2
    assert all("main thread" in str(e) for e in errors)
    assert not (tmp_path / "b").exists()  # raised before anything was locked or written


def demo(backup_dir: Path, out: Path, *options: str, sleep: float = 0.05) -> Worker:
    return Worker([
        sys.executable, "-m", "keras_impl.demo", "--backup-dir", str(backup_dir), "--out", str(out),
        "--epochs", "2", "--batch-sleep", str(sleep), *options,
    ])  # fmt: skip


def signal_inside_an_epoch(worker: Worker, sig: signal.Signals) -> None:
    assert worker.wait_event("start", 120) is not None, worker.failure()
    time.sleep(0.3)  # a few batches into the epoch (0.05 s per batch)
    worker.proc.send_signal(sig)


def test_demo_worker_stops_on_sigterm_and_listed_signals_and_resumes_exactly(tmp_path):
    """SIGTERM, then SIGUSR1 (listed) stop the worker with exit code 143 and a backup of their step; the
    third run ends with the uninterrupted run's weights. SIGUSR1 not listed keeps its default action."""
    reference = demo(tmp_path / "reference", tmp_path / "reference.json", sleep=0.0)
    unlisted = demo(tmp_path / "unlisted", tmp_path / "unlisted.json", "--save-before-preemption")
    try:
        signal_inside_an_epoch(unlisted, signal.SIGUSR1)
        assert unlisted.finish(60) == -signal.SIGUSR1, unlisted.failure()  # killed: not handled
        assert reference.finish(120) == 0, reference.failure()
    finally:
        for worker in (reference, unlisted):
            if worker.proc.poll() is None:
                worker.kill()
    assert "Preempted" not in "".join(unlisted.stderr)
    backup_dir, out, slot = tmp_path / "backup", tmp_path / "out.json", Slot(tmp_path / "backup")
    steps = []
    for sig, listed in ((signal.SIGTERM, ()), (signal.SIGUSR1, ("SIGTERM", "SIGUSR1"))):
        victim = demo(backup_dir, out, "--save-before-preemption", *listed)
        try:
            signal_inside_an_epoch(victim, sig)
            assert victim.finish(60) == EXIT_PREEMPTED, victim.failure()
        finally:
            if victim.proc.poll() is None:
                victim.kill()
        start, manifest = victim.wait_event("start", 0), slot.read_manifest()
        assert start["global_step"] == (steps[-1] if steps else 0)
        # At most 0.3 s / 0.05 s + 1 batches per run: both stop inside epoch 0, at their step.
        assert manifest is not None and manifest.epoch == 0 and manifest.step_in_epoch > 0
        assert manifest.global_step == manifest.step_in_epoch >= start["global_step"]
        lines = [line for line in victim.stderr if line.startswith(("WARNING keras_impl", "WARNING unified"))]
        assert len(lines) == 1
        assert lines[0].startswith(f"WARNING unified_backup.lifecycle: Preempted by {sig.name}: ")
        assert f"global step {manifest.global_step} " in lines[0] and "exit code 143" in lines[0]
        assert str(backup_dir) in lines[0] and not out.exists()
        steps.append(manifest.global_step)
    survivor = demo(backup_dir, out, "--save-before-preemption", sleep=0.0)
    assert survivor.finish(120) == 0, survivor.failure()
    assert survivor.wait_event("start", 0)["global_step"] == steps[-1]
    expected, result = (json.loads(p.read_text()) for p in (tmp_path / "reference.json", out))
    assert result["weights"] == expected["weights"] and result["weights_sha256"] == expected["weights_sha256"]
    digest = hashlib.sha256(np.asarray(result["weights"], "<f8").tobytes()).hexdigest()
    assert result["weights_sha256"] == digest
    assert not backup_dir.exists()
