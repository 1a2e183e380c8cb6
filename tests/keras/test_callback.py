"""Keras-specific behaviour of ``keras_impl.BackupAndRestore``, on the real framework and real files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_impl import BackupAndRestore, pipeline, resume
from keras_impl.state import KerasTrainingState, canonical_paths
from tests.conformance.keras_driver import BATCH, KerasDriver, data
from unified_backup import (
    CorruptBackupError,
    IncompatibleBackupError,
    InvalidArgumentError,
    Manifest,
    Position,
    SingleProcess,
    Slot,
    UnsupportedEnvironmentError,
)

pytestmark = pytest.mark.keras

STEPS = 8  # per epoch: 64 samples, batch 8
driver = KerasDriver()


def new_model(**run_args) -> keras.Model:
    return driver.new_run(**run_args).model


class Interrupt(keras.callbacks.Callback):
    """Raises before batch ``batch`` of epoch ``epoch`` (place it before BackupAndRestore)."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.at, self.epoch = (epoch, batch), -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupt")


class Epochs(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def fit(model, callbacks, epochs=4, **kwargs):
    """Train on the standard data; return the epochs begun, or raise what fit raised."""
    x, y = data()
    epochs_seen = Epochs()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[epochs_seen, *callbacks],
        **kwargs,
    )
    return epochs_seen.seen


def interrupted(backup_dir, model=None, at=(2, 3), **callback_args) -> BackupAndRestore:
    callback = BackupAndRestore(backup_dir, **callback_args)
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(model if model is not None else new_model(), [Interrupt(*at), callback])
    callback.release()  # what the process's end would do to the lock
    return callback


def manifest_counters(backup_dir) -> tuple[int, int, int]:
    body = json.loads((backup_dir / "manifest.json").read_text())
    return body["epoch"], body["step_in_epoch"], body["global_step"]


def unbuilt_model(seed=0, dropout=False):
    init = keras.initializers.GlorotUniform
    layers = [keras.layers.Dense(8, activation="relu", kernel_initializer=init(seed))]
    if dropout:
        layers.append(keras.layers.Dropout(0.5, seed=seed))
    layers.append(keras.layers.Dense(1, kernel_initializer=init(seed + 1000)))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def assert_same(actual: keras.Model, expected: keras.Model) -> None:
    for a, e in zip(actual.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(a, e)


def test_arguments_are_validated_and_exposed(tmp_path):
    callback = BackupAndRestore(str(tmp_path / "b"), save_freq=5, delete_checkpoint=False)
    assert callback.backup_dir == tmp_path / "b" and callback.save_freq == 5
    assert callback.delete_checkpoint is False and callback.save_before_preemption is False
    assert callback.restored is None and callback.stats.backups == 0
    with pytest.raises(InvalidArgumentError, match="save_freq"):
        BackupAndRestore(tmp_path, save_freq=0)
    assert BackupAndRestore(tmp_path, save_before_preemption=True).save_before_preemption is True
    listed = BackupAndRestore(tmp_path, save_before_preemption=["SIGTERM", "SIGUSR1"])
    assert listed.save_before_preemption == ("SIGTERM", "SIGUSR1")
    with pytest.raises(InvalidArgumentError, match="save_before_preemption"):
        BackupAndRestore(tmp_path, save_before_preemption=["SIGNOPE"])


def test_unbuilt_model_trains_backs_up_and_resumes_exactly(tmp_path):
    control = unbuilt_model()
    fit(control, [])
    first = unbuilt_model()
    interrupted(tmp_path / "b", first)
    assert manifest_counters(tmp_path / "b") == (2, 0, 2 * STEPS)
    resumed, callback = unbuilt_model(seed=7), BackupAndRestore(tmp_path / "b")
    assert not resumed.built
    assert fit(resumed, [callback]) == [2, 3]
    assert int(resumed.optimizer.iterations) == 4 * STEPS
    assert_same(resumed, control)
    assert not (tmp_path / "b").exists()
    assert fit(resumed, [], epochs=1) == [0]  # nothing of the resume is left on the model
    assert int(resumed.optimizer.iterations) == 5 * STEPS


def test_unbuilt_model_resumes_inside_an_epoch(tmp_path):
    control = unbuilt_model()
    fit(control, [])
    interrupted(tmp_path / "b", unbuilt_model(), at=(1, 6), save_freq=5)
    assert manifest_counters(tmp_path / "b") == (1, 2, 10)
    resumed = unbuilt_model(seed=7)
    assert fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=5)]) == [1, 2, 3]
    assert int(resumed.optimizer.iterations) == 4 * STEPS
    assert_same(resumed, control)


def test_unbuilt_model_falls_back_to_the_previous_backup_before_fit_picks_its_first_epoch(
    tmp_path, monkeypatch
):
    """Where the input's structure is unknown, fit's first epoch is set from the opened backup and the
    model restored at its first step: opening must already pick the previous backup."""
    monkeypatch.setattr(pipeline, "inspect_fit_input", lambda: pipeline.UNKNOWN)
    control = unbuilt_model()
    fit(control, [])
    interrupted(tmp_path / "b", unbuilt_model(), keep_previous=True)
    slot = Slot(tmp_path / "b")
    newest = slot.read_manifest()
    (slot.payload_dir(newest) / max(newest.files, key=lambda n: newest.files[n].bytes)).write_bytes(b"x")
    resumed = unbuilt_model(seed=7)
    assert not resumed.built
    assert fit(resumed, [BackupAndRestore(tmp_path / "b", keep_previous=True)]) == [1, 2, 3]
    assert_same(resumed, control)


class Batches(keras.callbacks.Callback):
    """Every batch hook call: (hook, epoch, batch, the optimizer's step counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int, int]] = []
        self.epoch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(("begin", self.epoch, batch, int(self.model.optimizer.iterations)))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("end", self.epoch, batch, int(self.model.optimizer.iterations)))


@pytest.mark.parametrize(
    ("save_freq", "counters"), [(5, (1, 2, 10)), ("epoch", (1, 0, 8))], ids=["inside-an-epoch", "epoch-end"]
)
def test_a_restore_at_the_first_step_hides_the_skipped_batches_from_every_callback(
    tmp_path, monkeypatch, save_freq, counters
):
    """Where only the first step can build the model, the restore (and so the number of batches to skip)
    happens after that step's on_train_batch_begin: that call is held until the step knows whether it
    only reads (then never called) or trains (then called before it trains, on the restored model)."""
    monkeypatch.setattr(pipeline, "inspect_fit_input", lambda: pipeline.UNKNOWN)
    control, seen = unbuilt_model(), Batches()
    fit(control, [seen])
    interrupted(tmp_path / "b", unbuilt_model(), at=(1, 6), save_freq=save_freq)
    epoch, skipped, step = manifest_counters(tmp_path / "b")
    assert (epoch, skipped, step) == counters
    resumed, resumed_seen = unbuilt_model(seed=7), Batches()
    assert fit(resumed, [resumed_seen, BackupAndRestore(tmp_path / "b", save_freq=save_freq)]) == [1, 2, 3]
    assert resumed_seen.calls[:2] == [("begin", 1, skipped, step), ("end", 1, skipped, step + 1)]
    assert resumed_seen.calls == [call for call in seen.calls if call[1:3] >= (1, skipped)]
    assert_same(resumed, control)


def test_an_error_in_the_first_batch_hook_after_the_skip_leaves_nothing_of_the_resume_behind(tmp_path):
    """The first trained batch's on_train_batch_begin runs inside the train function (held there until
    the skip is over): when it raises, the model's train function and the user's CallbackList are put
    back, and a later fit without BackupAndRestore calls every hook once."""
    interrupted(tmp_path / "b", at=(1, 6), save_freq=4)
    assert manifest_counters(tmp_path / "b") == (1, 4, 12)
    model, seen = new_model(seed=1), Batches()
    model.make_train_function()
    original = model.train_function
    callback = BackupAndRestore(tmp_path / "b", save_freq=4)
    callback_list = keras.callbacks.CallbackList([seen, Interrupt(1, 4), callback], model=model)
    x, y = data()
    with pytest.raises(RuntimeError, match="interrupt"):
        model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=callback_list)
    callback.release()
    assert seen.calls == [("begin", 1, 4, 12)]
    assert not any(name.startswith("on_train_batch") for name in vars(callback_list))
    assert model.train_function is original
    seen.calls.clear()
    assert fit(model, [seen], epochs=1) == [0]
    assert [call[:3] for call in seen.calls] == [
        (hook, 0, b) for b in range(STEPS) for hook in ("begin", "end")
    ]


def test_a_restore_refused_at_the_first_step_leaves_nothing_of_the_resume_behind(tmp_path, monkeypatch):
    """A backup of another model, found only when the first step built this one: fit raises the
    refusal from inside the train function (the skip's hooks held), and a later fit without
    BackupAndRestore neither restores nor calls a held hook."""
    monkeypatch.setattr(pipeline, "inspect_fit_input", lambda: pipeline.UNKNOWN)
    interrupted(tmp_path / "b", unbuilt_model(), at=(1, 6), save_freq=5)
    other = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    other.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    seen = Batches()
    callback = BackupAndRestore(tmp_path / "b", save_freq=5)
    callback_list = keras.callbacks.CallbackList([seen, callback], model=other)
    x, y = data()
    with pytest.raises(IncompatibleBackupError):
        other.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=callback_list)
    assert seen.calls == []
    assert not isinstance(other.train_function, resume._FirstSteps)  # before any release()
    assert not any(name.startswith("on_train_batch") for name in vars(callback_list))
    callback.release()
    assert fit(other, [seen], epochs=1) == [0]
    assert [call[:3] for call in seen.calls] == [
        (hook, 0, b) for b in range(STEPS) for hook in ("begin", "end")
    ]
    assert seen.calls[0][3] == 0  # trained from its own first step: nothing was restored


def test_dropout_rng_state_is_restored(tmp_path):
    control = unbuilt_model(dropout=True)
    fit(control, [])
    interrupted(tmp_path / "b", unbuilt_model(dropout=True))
    resumed = unbuilt_model(seed=7, dropout=True)
    fit(resumed, [BackupAndRestore(tmp_path / "b")])
    assert_same(resumed, control)


def test_early_stopping_after_a_resume_is_a_success_and_deletes(tmp_path):
    interrupted(tmp_path / "b")
    model = new_model(seed=1)
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=0)
    assert fit(model, [stop, BackupAndRestore(tmp_path / "b")], epochs=10) == [2, 3]
    assert not (tmp_path / "b").exists()
    assert fit(model, [], epochs=2) == [0, 1]  # a later plain fit starts at its first epoch


def test_user_initial_epoch_without_a_backup_is_honoured(tmp_path):
    model = new_model()
    assert fit(model, [BackupAndRestore(tmp_path / "b")], initial_epoch=2) == [2, 3]
    assert int(model.optimizer.iterations) == 2 * STEPS


def test_a_backup_wins_over_the_user_initial_epoch(tmp_path):
    interrupted(tmp_path / "b", at=(1, 3))  # backup after epoch 1
    assert fit(new_model(seed=1), [BackupAndRestore(tmp_path / "b")], initial_epoch=3) == [1, 2, 3]


def test_a_backup_inside_epoch_0_wins_over_the_user_initial_epoch(tmp_path):
    control = new_model()
    fit(control, [])
    interrupted(tmp_path / "b", at=(0, 5), save_freq=2)
    assert manifest_counters(tmp_path / "b") == (0, 4, 4)
    resumed = new_model(seed=1)
    assert fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=2)], initial_epoch=2) == [0, 1, 2, 3]
    assert_same(resumed, control)


def test_nothing_is_left_on_the_model_after_a_resumed_fit(tmp_path):
    interrupted(tmp_path / "b", at=(2, 5), save_freq=3)
    model = new_model(seed=1)
    assert fit(model, [BackupAndRestore(tmp_path / "b", save_freq=3)]) == [2, 3]
    # Keras's own BackupAndRestore leaves _initial_epoch set: a later plain fit then runs fewer epochs.
    before = int(model.optimizer.iterations)
    assert fit(model, [], epochs=4) == [0, 1, 2, 3]
    assert int(model.optimizer.iterations) - before == 4 * STEPS


@pytest.mark.parametrize(
    ("save_freq", "at", "expected"),
    [
        (3, (1, 5), (1, 4, 12)),  # backups at steps 3, 6, 9, 12: the last is 4 steps into epoch 1
        (8, (1, 3), (1, 0, 8)),  # a backup at an epoch's last batch is recorded as that epoch's end
        (5, (0, 7), (0, 5, 5)),
    ],
)
def test_step_backups_record_exact_counters(tmp_path, save_freq, at, expected):
    callback = interrupted(tmp_path / "b", at=at, save_freq=save_freq)
    assert manifest_counters(tmp_path / "b") == expected
    assert callback.stats.backups == expected[2] // save_freq


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_resume_inside_an_epoch_skips_trained_batches_and_matches_uninterrupted(
    tmp_path, caplog, steps_per_execution
):
    def model(seed):
        run = new_model(seed=seed)
        run.compile(keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=steps_per_execution)
        return run

    control = model(0)
    fit(control, [])
    interrupted(tmp_path / "b", model(0), at=(2, 6), save_freq=4)
    assert manifest_counters(tmp_path / "b") == (2, 4, 20)
    resumed = model(1)
    with caplog.at_level(logging.INFO, logger="keras_impl"):
        assert fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=4)]) == [2, 3]
    assert int(resumed.optimizer.iterations) == 4 * STEPS  # 4 batches of epoch 2 skipped, not redone
    assert_same(resumed, control)
    records = [r for r in caplog.records if r.name.startswith("keras_impl")]
    assert [r.levelno for r in records] == [logging.INFO]  # unshuffled arrays: exact, nothing to warn about
    assert "first 4 batch(es)" in records[0].getMessage() and "epoch 2" in records[0].getMessage()


def test_changed_steps_per_execution_still_trains_each_batch_once(tmp_path):
    control = new_model()
    fit(control, [])
    interrupted(tmp_path / "b", at=(1, 2), save_freq=3)  # backup 1 epoch + 1 step in
    assert manifest_counters(tmp_path / "b") == (1, 1, 9)
    resumed = new_model(seed=1)
    resumed.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=2)
    fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=3)])
    assert int(resumed.optimizer.iterations) == 4 * STEPS
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in resumed.get_weights()]),
        np.concatenate([w.ravel() for w in control.get_weights()]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_fingerprint_is_stable_across_rebuilds_in_one_process():
    def built(optimizer):
        run = new_model(optimizer=optimizer)
        run.optimizer.build(run.trainable_variables)
        return KerasTrainingState(run).fingerprint()

    first, again = built("adam"), built("adam")
    assert first == again
    assert first["model/sequential/dense/kernel"] == "float32[4, 8]"
    assert first["optimizer/sequential_dense_kernel_momentum"] == "float32[4, 8]"
    assert first["optimizer/class"] == "Adam" and built("sgd")["optimizer/class"] == "SGD"


def test_canonical_paths_renumber_per_process_suffixes_but_keep_layers_apart():
    paths = ["seq_3/dense_4/kernel", "seq_3/dense_5/kernel", "seq_3/block_1/kernel"]
    expected = ["seq/dense/kernel", "seq/dense_1/kernel", "seq/block/kernel"]
    assert list(canonical_paths(paths).values()) == expected


def test_state_translates_a_damaged_checkpoint(tmp_path):
    model = new_model()
    fit(model, [], epochs=1)
    state = KerasTrainingState(model)
    state.save(tmp_path, Position.epoch_end(1, STEPS), SingleProcess())
    fake = Manifest("keras", "x", 1, 0, STEPS, {}, {}, "payload-x")
    state.load(tmp_path, fake, SingleProcess())  # intact: loads
    wrong = Manifest("keras", "x", 2, 0, STEPS, {}, {}, "payload-x")
    with pytest.raises(CorruptBackupError, match="counters"):
        state.load(tmp_path, wrong, SingleProcess())
    data_file = next(tmp_path.glob("ckpt-*.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(CorruptBackupError):
        state.load(tmp_path, fake, SingleProcess())
    (tmp_path / "checkpoint").unlink()
    with pytest.raises(CorruptBackupError, match="checkpoint state"):
        state.load(tmp_path, fake, SingleProcess())


TRY_LOCK = textwrap.dedent(
    """
    import sys
    from unified_backup import BackupDirInUseError
    from unified_backup.lock import DirectoryLock
    try:
        DirectoryLock(sys.argv[1]).acquire()
        print("locked")
    except BackupDirInUseError:
        print("in use")
    """
)


def test_release_after_a_fit_that_raised_frees_the_folder_for_another_process(tmp_path):
    """Keras calls no hook when fit raises: the folder stays this process's until release()."""
    callback = BackupAndRestore(tmp_path / "b")
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(new_model(), [Interrupt(2, 3), callback])

    def other_process() -> str:
        argv = [sys.executable, "-c", TRY_LOCK, str(tmp_path / "b")]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()

    assert other_process() == "in use"
    callback.release()
    assert other_process() == "locked"
    assert manifest_counters(tmp_path / "b") == (2, 0, 2 * STEPS)  # the backup stays
    Slot(tmp_path / "b").verify(Slot(tmp_path / "b").read_manifest())


def test_keras_own_backup_callback_in_the_same_fit_is_refused(tmp_path):
    theirs = keras.callbacks.BackupAndRestore(str(tmp_path / "theirs"))
    with pytest.raises(UnsupportedEnvironmentError, match=r"keras\.callbacks\.BackupAndRestore.*Keep one"):
        fit(driver.new_run().model, [BackupAndRestore(tmp_path / "ours"), theirs])
    assert not (tmp_path / "ours").exists() and not (tmp_path / "theirs").exists()
