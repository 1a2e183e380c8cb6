"""Keras behaviour that needs a process of its own: device setup, eager mode, a missing framework."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.harness import Worker
from unified_backup import Slot

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))


def run_python(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run Python in the repository root; ``subprocess.run`` SIGKILLs it if it outlives ``timeout``."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("flavour", ["keras", pytest.param("tf_keras", marks=pytest.mark.tf_keras)])
def test_mirrored_strategy_interrupted_then_resumed_equals_uninterrupted(flavour):
    done = run_python(["-m", "tests.keras.mirrored_worker", flavour])
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["replicas"] == 2
    assert result["epoch"]["counters"] == [2, 0, 16]
    assert result["steps"]["counters"] == [2, 5, 21]  # save_freq=3, interrupted before batch 6 of epoch 2
    assert result["preempted"]["counters"] == [1, 5, 13]  # SIGTERM during batch 4 of epoch 1
    for name, epochs in (("epoch", ["2", "3"]), ("steps", ["2", "3"]), ("preempted", ["1", "2", "3"])):
        outcome = result[name]
        assert outcome["epochs_run"] == [int(e) for e in epochs] and outcome["iterations"] == 32
        assert not outcome["left"]
        np.testing.assert_array_equal(outcome["weights"], result["reference"])
        # The resumed epoch's mean loss still counts the batches before the backup (per-replica metric state).
        assert outcome["losses"] == {e: result["reference_losses"][e] for e in epochs}
    # Built in fit, with a compiled metric: restored inside an epoch all the same.
    assert result["unbuilt"]["counters"] == [2, 5, 21] and not result["unbuilt"]["left"]
    assert result["unbuilt"]["epochs_run"] == [2, 3] and result["unbuilt"]["iterations"] == 32
    assert result["unbuilt"]["losses"] == {e: result["reference_losses"][e] for e in ("2", "3")}
    np.testing.assert_array_equal(result["unbuilt"]["weights"], result["reference"])


def test_disabled_eager_execution_is_refused():
    code = textwrap.dedent(
        """
        import tensorflow as tf
        tf.compat.v1.disable_eager_execution()
        from keras_impl import BackupAndRestore
        from unified_backup import UnsupportedEnvironmentError
        try:
            BackupAndRestore("backup")
        except UnsupportedEnvironmentError as exc:
            print("refused:", exc)
        """
    )
    done = run_python(["-c", code])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "eager execution" in done.stdout


def test_importing_without_tensorflow_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow"] = None
        from unified_backup import MissingFrameworkError
        try:
            import keras_impl
        except MissingFrameworkError as exc:
            assert isinstance(exc, ImportError)
            print("missing:", exc)
        """
    )
    done = run_python(["-c", code], timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install 'unified-backup[keras]'" in done.stdout


def test_another_keras_backend_is_refused():
    code = textwrap.dedent(
        """
        from unified_backup import UnsupportedEnvironmentError
        try:
            import keras_impl
        except UnsupportedEnvironmentError as exc:
            print("refused:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(ENV, KERAS_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "'torch'" in done.stdout
    assert "KERAS_BACKEND=tensorflow" in done.stdout


@pytest.mark.parametrize(
    ("flavour", "async_backup"),
    [("keras", False), pytest.param("tf_keras", False, marks=pytest.mark.tf_keras), ("keras", True)],
    ids=["keras", "tf_keras", "keras-async"],
)
def test_sigkill_under_mirrored_strategy_resumes_bit_identical(tmp_path, flavour, async_backup):
    """The demo worker under MirroredStrategy (two logical CPUs), SIGKILLed inside an epoch once a step
    backup is committed, then run again: it ends with the weights of its uninterrupted run (also with
    ``async_backup``: the snapshot of mirrored variables)."""
    module = {"keras": "keras_impl.demo", "tf_keras": "keras_impl.tf_keras_demo"}[flavour]

    def argv(backup_dir: Path, out: Path, sleep: float) -> list[str]:
        return [sys.executable, "-m", module, "--backup-dir", str(backup_dir), "--out", str(out),
                "--batch-sleep", str(sleep), "--epochs", "3", "--save-freq", "5", "--mirrored",
                *(["--async-backup"] if async_backup else [])]  # fmt: skip

    reference = Worker(argv(tmp_path / "reference", tmp_path / "reference.json", 0.0))
    assert reference.finish(180) == 0, reference.failure()
    backup_dir, slot = tmp_path / "backup", Slot(tmp_path / "backup")
    victim = Worker(argv(backup_dir, tmp_path / "out.json", 0.05))
    try:
        deadline = time.monotonic() + 120
        while (manifest := slot.read_manifest()) is None or manifest.epoch < 1 or not manifest.step_in_epoch:
            assert victim.proc.poll() is None and time.monotonic() < deadline, victim.failure()
            time.sleep(0.01)
    finally:
        victim.kill()  # SIGKILL
    assert victim.proc.returncode == -signal.SIGKILL
    survivor = Worker(argv(backup_dir, tmp_path / "out.json", 0.0))
    assert survivor.finish(180) == 0, survivor.failure()
    assert survivor.wait_event("start", 0)["global_step"] >= manifest.global_step
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
    assert not backup_dir.exists()


def test_sigkill_inside_an_epoch_of_a_reshuffled_dropout_run_resumes_bit_identical(tmp_path):
    """The demo worker with ``--shuffle --dropout 0.2 --save-freq 5``, SIGKILLed once a backup inside an
    epoch is committed, then run again: it ends with the weights of its uninterrupted run."""
    args = ["--epochs", "4", "--shuffle", "--dropout", "0.2", "--save-freq", "5"]

    def argv(backup_dir: Path, out: Path, sleep: float) -> list[str]:
        return [
            sys.executable,
            "-m",
            "keras_impl.demo",
            "--backup-dir",
            str(backup_dir),
            "--out",
            str(out),
            "--batch-sleep",
            str(sleep),
            *args,
        ]

    reference = Worker(argv(tmp_path / "reference", tmp_path / "reference.json", 0.0))
    assert reference.finish(180) == 0, reference.failure()
    backup_dir, slot = tmp_path / "backup", Slot(tmp_path / "backup")
    victim = Worker(argv(backup_dir, tmp_path / "out.json", 0.05))
    try:
        assert victim.wait_event("epoch", 180) is not None, victim.failure()  # epoch 0 done
        deadline = time.monotonic() + 60
        while (manifest := slot.read_manifest()) is None or manifest.epoch < 1 or not manifest.step_in_epoch:
            assert victim.proc.poll() is None and time.monotonic() < deadline, victim.failure()
            time.sleep(0.01)
    finally:
        victim.kill()  # SIGKILL
    assert victim.proc.returncode == -signal.SIGKILL
    manifest = slot.read_manifest()
    assert manifest.epoch >= 1 and manifest.step_in_epoch > 0 and manifest.global_step % 5 == 0
    survivor = Worker(argv(backup_dir, tmp_path / "out.json", 0.0))
    assert survivor.finish(180) == 0, survivor.failure()
    start, done = survivor.wait_event("start", 0), survivor.wait_event("done", 0)
    assert start["restored_epoch"] == manifest.epoch and start["global_step"] == manifest.global_step
    assert done["epochs_run"] == 4 - manifest.epoch
    log = "".join(survivor.stderr)
    assert "read again and skipped (input: a PyDataset (Reshuffled))" in log  # exact: no warning
    assert "does not reproduce" not in log
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
    assert not backup_dir.exists()
