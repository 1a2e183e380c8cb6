"""Keras behaviour that needs a process of its own: device setup, eager mode, a missing framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))


def run_python(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run Python in the repository root; ``subprocess.run`` SIGKILLs it if it outlives ``timeout``."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_mirrored_strategy_interrupted_then_resumed_equals_uninterrupted():
    done = run_python(["-m", "tests.keras.mirrored_worker"])
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["replicas"] == 2
    assert result["epoch"]["counters"] == [2, 0, 16]
    assert result["steps"]["counters"] == [2, 5, 21]  # save_freq=3, interrupted before batch 6 of epoch 2
    for name in ("epoch", "steps"):
        outcome = result[name]
        assert outcome["epochs_run"] == [2, 3] and outcome["iterations"] == 32 and not outcome["left"]
        np.testing.assert_array_equal(outcome["weights"], result["reference"])


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
        [sys.executable, "-c", code], cwd=ROOT, env=dict(ENV, KERAS_BACKEND="torch"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "'torch'" in done.stdout
    assert "KERAS_BACKEND=tensorflow" in done.stdout
