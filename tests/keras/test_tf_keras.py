"""tf_keras (legacy tf.keras) through the same ``BackupAndRestore``: what differs from Keras 3.

The conformance suite runs every shared scenario against tf_keras too; these are the tf_keras-only
cases: its optimizers and models, its array input (one iterator across epochs), its Dropout's
random-number generators, its own callback, and a user's script swapping the import.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")

from keras_impl import BackupAndRestore  # noqa: E402
from tests.conformance.keras_driver import (  # noqa: E402
    BATCH,
    KerasDriver,
    TfKerasDriver,
    callbacks_of,
    data,
    tf_keras_reshuffled,
)
from unified_backup import IncompatibleBackupError, Slot, UnsupportedEnvironmentError  # noqa: E402

pytestmark = pytest.mark.tf_keras

ROOT = Path(__file__).resolve().parents[2]
Interrupt, EpochRecorder = callbacks_of(tf_keras)


def fit(
    model: Any,
    backup_dir: Path | None,
    *,
    epochs: int = 4,
    interrupt: Any = None,
    seed: int = 0,
    save_freq: Any = "epoch",
    callbacks: Sequence[Any] = (),
    **fit_args: Any,
) -> tuple[Any, BaseException | None]:
    """Fit on the standard data; return the epoch recorder and the error ``fit`` raised (None if none)."""
    recorder = EpochRecorder()
    extra: list[Any] = [recorder, *callbacks]
    if interrupt is not None:
        extra.append(Interrupt(interrupt))
    backup = BackupAndRestore(backup_dir, save_freq=save_freq) if backup_dir is not None else None
    tf_keras.utils.set_random_seed(seed)
    x, y = data()
    inputs = {"x": x, "y": y, "batch_size": BATCH} | fit_args
    try:
        model.fit(**inputs, epochs=epochs, verbose=0, callbacks=[*extra, *([backup] if backup else [])])
    except Exception as exc:  # noqa: BLE001 - returned to the test
        if backup is not None:
            backup.release()
        return recorder, exc
    return recorder, None


def weights(model: Any) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def assert_same(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def model_of(build: Any, seed: int) -> Any:
    tf_keras.utils.set_random_seed(seed)  # other initial weights per run: the restore overwrites them
    return build()


def interrupted_then_resumed(build: Any, tmp_path: Path, *, at: tuple[int, int] = (1, 3), save_freq: Any = 5,
                             seed: int = 0, **fit_args: Any) -> tuple[Any, Any]:  # fmt: skip
    """(reference model, resumed model): trained alike, the second interrupted at ``at`` and resumed."""
    reference = model_of(build, 100)
    assert fit(reference, tmp_path / "reference", seed=seed, save_freq=save_freq, **fit_args)[1] is None
    backup_dir = tmp_path / "backup"
    _, error = fit(model_of(build, 100), backup_dir, interrupt=at, seed=seed, save_freq=save_freq, **fit_args)
    assert isinstance(error, RuntimeError) and Slot(backup_dir).read_manifest() is not None
    resumed = model_of(build, 102)
    assert fit(resumed, backup_dir, seed=seed, save_freq=save_freq, **fit_args)[1] is None
    assert not backup_dir.exists()
    return reference, resumed


def sequential(**dropout: Any) -> Any:
    layers = [tf_keras.Input((4,)), tf_keras.layers.Dense(8, "relu")]
    if dropout:
        layers.append(tf_keras.layers.Dropout(0.2, **dropout))
    model = tf_keras.Sequential([*layers, tf_keras.layers.Dense(1)])
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
    return model


def test_nothing_is_left_on_the_model_so_a_second_fit_is_a_first_one(tmp_path):
    """Ours leaves nothing on the model (tf_keras's own callback deletes ``model._training_state``, and
    a later ``fit`` of that model then crashes): a plain ``fit`` after a resumed one starts at epoch 0."""
    model = TfKerasDriver().new_run().model
    assert fit(model, tmp_path / "backup", interrupt=(2, 3))[1] is not None
    recorder, error = fit(model, tmp_path / "backup")
    assert error is None and recorder.epochs == [2, 3]
    recorder, error = fit(model, None, epochs=2)  # the same model, no callback
    assert error is None and recorder.epochs == [0, 1]
    assert int(model.optimizer.iterations.numpy()) == 6 * 8


def test_shuffled_arrays_resume_exactly_with_the_same_global_seed(tmp_path, caplog):
    """Arrays with ``shuffle=True`` draw each epoch's order from one iterator: the resumed fit reads the
    earlier epochs again (without training) so that epoch 2 gets the uninterrupted run's order."""
    with caplog.at_level(logging.INFO, logger="keras_impl"):
        reference, resumed = interrupted_then_resumed(sequential, tmp_path, at=(2, 6), shuffle=True)
    assert_same(weights(resumed), weights(reference))
    assert "Reading the 16 batch(es) of the epochs before epoch 2 again" in caplog.text
    assert "does not reproduce" not in caplog.text


def test_shuffled_arrays_with_another_global_seed_are_said_not_exact(tmp_path, caplog):
    backup_dir = tmp_path / "backup"
    assert fit(sequential(), backup_dir, interrupt=(2, 3), shuffle=True, seed=1)[1] is not None
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        assert fit(sequential(), backup_dir, shuffle=True, seed=2)[1] is None
    assert "which was 1 when the backup was made and is 2 now" in caplog.text


def test_stateful_dropout_resumes_exactly_and_legacy_dropout_is_said_not_to(tmp_path, caplog):
    reference, resumed = interrupted_then_resumed(lambda: sequential(rng_type="stateful"), tmp_path / "a")
    assert_same(weights(resumed), weights(reference))
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        interrupted_then_resumed(lambda: sequential(name="legacy_dropout"), tmp_path / "b")
    assert "legacy_dropout draw from tf_keras's default legacy stateful random ops" in caplog.text
    assert "rng_type='stateful'" in caplog.text


def test_legacy_optimizer_resumes_exactly(tmp_path):
    def build() -> Any:
        model = tf_keras.Sequential(
            [tf_keras.Input((4,)), tf_keras.layers.Dense(8, "relu"), tf_keras.layers.Dense(1)]
        )
        model.compile(optimizer=tf_keras.optimizers.legacy.Adam(1e-2), loss="mse")
        return model

    reference, resumed = interrupted_then_resumed(build, tmp_path)
    assert_same(weights(resumed), weights(reference))
    assert_same([np.array(v) for v in resumed.optimizer.variables()],
                [np.array(v) for v in reference.optimizer.variables()])  # fmt: skip


def test_async_backup_refuses_a_legacy_optimizer_when_fit_starts(tmp_path):
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1)])
    model.compile(optimizer=tf_keras.optimizers.legacy.Adam(1e-2), loss="mse")
    x, y = data()
    backup = BackupAndRestore(tmp_path / "backup", save_freq=1, async_backup=True)
    with pytest.raises(UnsupportedEnvironmentError, match="legacy optimizer .* async_backup=False"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[backup])
    assert int(model.optimizer.iterations.numpy()) == 0 and not (tmp_path / "backup").exists()


def test_an_unbuilt_subclassed_model_resumes_exactly(tmp_path):
    class Regressor(tf_keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden, self.out = tf_keras.layers.Dense(8, "relu"), tf_keras.layers.Dense(1)

        def call(self, x: Any) -> Any:
            return self.out(self.hidden(x))

    def build() -> Any:
        model = Regressor()
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
        return model

    reference, resumed = interrupted_then_resumed(build, tmp_path)
    assert_same(weights(resumed), weights(reference))


@pytest.mark.parametrize("theirs_first", [True, False], ids=["theirs-first", "ours-first"])
def test_tf_keras_own_callback_in_the_same_fit_is_refused(tmp_path, theirs_first):
    theirs = tf_keras.callbacks.BackupAndRestore(str(tmp_path / "theirs"))
    model, ours = sequential(), BackupAndRestore(tmp_path / "ours")
    x, y = data()
    refused = r"tf\.keras\.callbacks\.BackupAndRestore.*Keep one"
    with pytest.raises(UnsupportedEnvironmentError, match=refused):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[theirs, ours] if theirs_first else [ours, theirs])
    assert not (tmp_path / "theirs").exists()  # refused before either callback backed up


def test_what_tf_keras_own_callback_left_on_the_model_does_not_stop_a_later_fit(tmp_path):
    model = sequential()
    theirs = tf_keras.callbacks.BackupAndRestore(str(tmp_path / "theirs"))
    assert fit(model, None, interrupt=(1, 2), callbacks=[theirs])[1] is not None  # leaves its state
    recorder, error = fit(model, tmp_path / "ours", epochs=2)
    assert error is None and recorder.epochs == [0, 1]


def test_a_loss_scale_optimizer_resumes_exactly(tmp_path):
    def build() -> Any:
        layers = [tf_keras.Input((4,)), tf_keras.layers.Dense(8, "relu"), tf_keras.layers.Dense(1)]
        model = tf_keras.Sequential(layers)
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.Adam(1e-2))
        model.compile(optimizer=optimizer, loss="mse")
        return model

    reference, resumed = interrupted_then_resumed(build, tmp_path)
    assert_same(weights(resumed), weights(reference))


def test_changed_steps_per_execution_still_trains_each_batch_once(tmp_path):
    """Backed up at step 10 with steps_per_execution=1, resumed with 4: the resumed fit skips 2 batches
    and trains the other 2 of its first call (tf_keras would otherwise end fit at the input's end)."""

    def build(per_call: int) -> Any:
        model = model_of(sequential, 100)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=per_call)
        return model

    control = build(1)
    assert fit(control, None, shuffle=False)[1] is None
    backup_dir = tmp_path / "backup"
    assert fit(build(1), backup_dir, interrupt=(1, 5), save_freq=5, shuffle=False)[1] is not None
    resumed = build(4)
    recorder, error = fit(resumed, backup_dir, save_freq=5, shuffle=False)
    assert error is None and recorder.epochs == [1, 2, 3]
    assert int(resumed.optimizer.iterations.numpy()) == 32  # every batch trained once
    for a, e in zip(weights(resumed), weights(control), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_a_folder_holding_tf_keras_own_backup_is_not_read_and_is_left_alone(tmp_path):
    backup_dir = tmp_path / "backup"
    theirs = tf_keras.callbacks.BackupAndRestore(str(backup_dir))
    assert fit(sequential(), None, interrupt=(2, 1), callbacks=[theirs])[1] is not None
    left = sorted(p.relative_to(backup_dir).as_posix() for p in backup_dir.rglob("*"))
    assert any(name.startswith("chief/") for name in left)
    recorder, error = fit(sequential(), backup_dir)  # ours, on the same folder
    assert error is None and recorder.epochs == [0, 1, 2, 3]  # not read: a fresh start
    assert sorted(p.relative_to(backup_dir).as_posix() for p in backup_dir.rglob("*")) == left


class OnEpochEnd(tf_keras.utils.Sequence):
    """Batches of the standard data whose order the Sequence itself reshuffles at each epoch's end."""

    def __init__(self) -> None:
        super().__init__()
        self.x, self.y = data()

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __getitem__(self, index: int) -> Any:
        return self.x[index * BATCH : (index + 1) * BATCH], self.y[index * BATCH : (index + 1) * BATCH]

    def on_epoch_end(self) -> None:
        np.random.shuffle(self.x)


def _batches() -> Any:
    x, y = data()
    while True:
        for i in range(0, len(x), BATCH):
            yield x[i : i + BATCH], y[i : i + BATCH]


@pytest.mark.parametrize(
    ("inputs", "fit_args", "exact", "said"),
    [
        (lambda: data(), {"batch_size": BATCH, "shuffle": False}, True, "arrays with shuffle=False"),
        (lambda: data(), {"batch_size": BATCH, "shuffle": "batch"}, True, "arrays with shuffle='batch'"),
        (lambda: data(), {"batch_size": BATCH, "steps_per_epoch": 4}, True, "steps_per_epoch=4"),
        (lambda: (tf_keras_reshuffled()(*data(), BATCH),), {"shuffle": True}, True, "shuffle=True)"),
        (lambda: (OnEpochEnd(),), {}, False, "it defines on_epoch_end()"),
        (lambda: (tf_keras_reshuffled()(*data(), BATCH),), {"workers": 2}, False, "2 worker(s)"),
        (lambda: (_batches(),), {"steps_per_epoch": 8}, False, "a generator is read once"),
        (lambda: (dataset().repeat(),), {"steps_per_epoch": 8}, False, "reads one iterator across epochs"),
        (lambda: (dataset().shuffle(64),), {}, False, "reshuffles in every iteration"),
    ],
    ids=["arrays", "batch-shuffle", "arrays-steps", "sequence", "on-epoch-end", "workers", "generator",
         "dataset-steps", "reshuffling-dataset"],
)  # fmt: skip
def test_each_tf_keras_input_is_said_exact_or_not(inputs, fit_args, exact, said):
    """What the restore-time message says of each kind of tf_keras input (read in on_train_begin)."""
    from keras_impl import pipeline

    class Look(tf_keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.found = pipeline.inspect_tf_keras_fit_input()

    look = Look()
    sequential().fit(*inputs(), epochs=1, verbose=0, callbacks=[look], **fit_args)
    found = look.found
    message = found.resume_problem(0, 0) if found.seeded_by_tf else found.problem
    assert (message is None) == exact, message
    assert said in (found.description if exact else message)
    if "steps_per_epoch" in said:  # one iterator across epochs: the earlier epochs are read again
        assert found.batches_before(3, 0, 0) == 12


def dataset() -> Any:
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(data()).batch(BATCH)


@pytest.mark.parametrize(("writer", "reader"), [(KerasDriver, TfKerasDriver), (TfKerasDriver, KerasDriver)])
def test_a_backup_of_the_other_keras_flavour_is_refused_and_kept(tmp_path, writer, reader):
    backup_dir = tmp_path / "backup"
    assert writer().fit(writer().new_run(), backup_dir, epochs=4, interrupt=(2, 1)).error is not None
    files = sorted(p.name for p in backup_dir.rglob("*"))
    result = reader().fit(reader().new_run(), backup_dir, epochs=4)
    assert isinstance(result.error, IncompatibleBackupError)
    message = str(result.error)
    assert f"written by {writer.name}" in message and f"this training runs {reader.name}" in message
    assert sorted(p.name for p in backup_dir.rglob("*")) == files  # nothing deleted


def test_a_tf_keras_script_works_after_swapping_the_import(tmp_path):
    """A script written for ``tf.keras.callbacks.BackupAndRestore`` (``TF_USE_LEGACY_KERAS=1``), with
    only the import changed, is interrupted and run again: it resumes and ends like an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        import numpy as np
        import tensorflow as tf
        from keras_impl import BackupAndRestore  # was: BackupAndRestore = tf.keras.callbacks.BackupAndRestore

        class Interrupt(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if sys.argv[2] == "interrupt" and epoch == 2:
                    raise RuntimeError("interrupted")

        tf.keras.utils.set_random_seed(0)
        rs = np.random.RandomState(0)
        x = rs.normal(size=(64, 4)).astype("float32")
        y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
        model = tf.keras.Sequential([tf.keras.layers.Dense(8, activation="relu"), tf.keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        backup = BackupAndRestore(backup_dir=sys.argv[1], save_freq="epoch", delete_checkpoint=True)
        callbacks = [Interrupt(), backup]
        history = model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=callbacks)
        print("FLAVOUR", type(model).__module__.split(".")[0], "EPOCHS", history.epoch)
        np.save(sys.argv[3], np.concatenate([w.ravel() for w in model.get_weights()]))
    """)
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))

    def run(backup: str, mode: str, out: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), str(tmp_path / backup), mode, str(tmp_path / out)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)

    reference = run("reference", "plain", "reference.npy")
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "FLAVOUR tf_keras EPOCHS [0, 1, 2, 3]" in reference.stdout
    assert run("backup", "interrupt", "unused.npy").returncode != 0
    assert Slot(tmp_path / "backup").read_manifest().framework == "tf_keras"
    resumed = run("backup", "plain", "resumed.npy")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "EPOCHS [2, 3]" in resumed.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "reference.npy"))
    assert not (tmp_path / "backup").exists()
