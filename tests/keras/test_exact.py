"""Exact resume on Keras: a run interrupted any number of times and resumed ends bit-identical to the
same run uninterrupted (weights, optimizer slots and step counter, each epoch's mean loss), and an
input that cannot be reproduced is named in one warning at restore time."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_impl import BackupAndRestore, pipeline
from keras_impl.state import EXTRA_FILE, KerasTrainingState
from tests.conformance.keras_driver import BATCH, KerasDriver, Reshuffled, data
from tests.keras import test_callback as plain
from tests.keras.test_callback import Interrupt
from unified_backup import CorruptBackupError, Counters, Manifest, Position, SingleProcess, Slot

pytestmark = pytest.mark.keras

STEPS = 8  # per epoch: 64 samples, batch 8
EPOCHS = 4
driver = KerasDriver()
EXACT = {"shuffle": True, "dropout": 0.2}


class Losses(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[int, dict[str, float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.losses[epoch] = dict(logs)


def keras_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("keras_impl") and r.levelno >= logging.WARNING
    ]


def assert_arrays_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize(
    ("run_args", "save_freq", "interrupts"),
    [
        pytest.param(EXACT, "epoch", [(2, 5)], id="epoch-once"),
        pytest.param(EXACT, "epoch", [(1, 3), (2, 0), (3, 6)], id="epoch-three-times"),
        pytest.param(EXACT, 3, [(2, 5)], id="step-once"),
        pytest.param(
            {**EXACT, "lr_schedule": True}, 3, [(0, 4), (1, 7), (3, 2)], id="step-three-times-lr-schedule"
        ),
        pytest.param(
            {**EXACT, "accumulate": 2}, 2, [(1, 6), (2, 4), (3, 2)], id="step-three-times-steps-per-execution"
        ),
        pytest.param(
            {**EXACT, "optimizer": "sgd", "lr_schedule": True}, 5, [(1, 2), (2, 7), (3, 3)], id="sgd"
        ),
    ],
)
def test_interrupted_runs_end_identical_to_the_uninterrupted_run(
    tmp_path, caplog, run_args, save_freq, interrupts
):
    reference = driver.new_run(seed=0, **run_args)
    expected = driver.fit(reference, None, epochs=EPOCHS)
    losses: dict[int, float] = {}
    run = driver.new_run(seed=0, **run_args)
    with caplog.at_level(logging.INFO, logger="keras_impl"):
        for number, (epoch, batch) in enumerate(interrupts, start=1):
            result = driver.fit(
                run, tmp_path / "b", epochs=EPOCHS, save_freq=save_freq, interrupt=(epoch, batch)
            )
            assert isinstance(result.error, RuntimeError), repr(result.error)
            assert result.global_step == epoch * STEPS + batch  # no batch trained twice, none left out
            assert not losses.keys() & result.losses.keys()
            losses.update(result.losses)
            manifest = Slot(tmp_path / "b").read_manifest()
            backed_up = (
                epoch * STEPS if save_freq == "epoch" else (epoch * STEPS + batch) // save_freq * save_freq
            )
            assert manifest.global_step == backed_up
            run = driver.new_run(seed=number, **run_args)  # a restarted job: the restore overrides its seed
        result = driver.fit(run, tmp_path / "b", epochs=EPOCHS, save_freq=save_freq)
    assert result.error is None and result.global_step == expected.global_step == EPOCHS * STEPS
    losses.update(result.losses)
    assert losses == expected.losses  # value for value, the resumed epochs' means included
    assert_arrays_equal(driver.weights(run), driver.weights(reference))
    assert_arrays_equal(driver.optimizer_state(run), driver.optimizer_state(reference))
    assert int(driver.optimizer_state(run)[0]) == EPOCHS * STEPS  # the step counter comes first
    assert not keras_warnings(caplog)  # a reshuffled PyDataset is reproduced: nothing to warn about
    assert not (tmp_path / "b").exists()


def test_gradient_accumulation_resumes_at_the_next_batch_not_the_next_optimizer_step(tmp_path):
    """Under ``gradient_accumulation_steps=2`` an optimizer step takes 2 batches: the manifest counts
    optimizer steps, the resume skips batches (e.g. 6 batches, not 3, after a backup at step 3)."""

    def new_run(seed):
        run = driver.new_run(seed=seed, **EXACT)
        run.model.compile(optimizer=keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2), loss="mse")
        return run

    reference = new_run(0)
    expected = driver.fit(reference, None, epochs=EPOCHS)
    assert expected.global_step == EPOCHS * STEPS // 2
    run, losses = new_run(0), {}
    for number, (epoch, batch) in enumerate([(1, 3), (2, 6), (3, 1)], start=1):
        result = driver.fit(run, tmp_path / "b", epochs=EPOCHS, save_freq=3, interrupt=(epoch, batch))
        assert isinstance(result.error, RuntimeError), repr(result.error)
        losses.update(result.losses)
        run = new_run(number)
    # The last backup, at optimizer step 12 (3 after step 9), fell on epoch 2's last batch (the 24th).
    assert Slot(tmp_path / "b").read_manifest().counters == Counters(3, 0, 12)
    result = driver.fit(run, tmp_path / "b", epochs=EPOCHS, save_freq=3)
    assert result.error is None and {**losses, **result.losses} == expected.losses
    assert_arrays_equal(driver.weights(run), driver.weights(reference))
    assert_arrays_equal(driver.optimizer_state(run), driver.optimizer_state(reference))


def test_the_reference_really_reshuffles_and_drops_out():
    """Guard against a test that cannot fail: each option changes the outcome of the run."""
    plain, reshuffled, dropped = (
        driver.new_run(**args) for args in ({}, {"shuffle": True}, {"dropout": 0.2})
    )
    for run in (plain, reshuffled, dropped):
        driver.fit(run, None, epochs=2)
    final = [np.concatenate([w.ravel() for w in driver.weights(run)]) for run in (plain, reshuffled, dropped)]
    assert not np.array_equal(final[0], final[1]) and not np.array_equal(final[0], final[2])


@pytest.mark.parametrize("resumed_seed", [0, 1])
def test_shuffled_arrays_are_exact_with_the_same_global_seed_and_warned_about_otherwise(
    tmp_path, caplog, resumed_seed
):
    def fit_arrays(model, seed, callbacks):
        keras.utils.set_random_seed(seed)  # fit(shuffle=True) on arrays draws its order from TF's global seed
        x, y = data()
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0, callbacks=callbacks)

    control, first, resumed = (driver.new_run(seed=s, dropout=0.2).model for s in (0, 0, 1))
    fit_arrays(control, 0, [])
    with pytest.raises(RuntimeError, match="interrupt"):
        fit_arrays(first, 0, [Interrupt(2, 5), BackupAndRestore(tmp_path / "b", save_freq=3)])
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        fit_arrays(resumed, resumed_seed, [BackupAndRestore(tmp_path / "b", save_freq=3)])
    same = all(
        np.array_equal(a, e) for a, e in zip(resumed.get_weights(), control.get_weights(), strict=True)
    )
    if resumed_seed == 0:
        assert same and not keras_warnings(caplog)
    else:
        (warning,) = keras_warnings(caplog)
        assert (
            "arrays with shuffle=True" in warning
            and "which was 0 when the backup was made and is 1 now" in warning
        )
        assert "first 5 batch(es)" in warning and "trained twice" in warning
        assert not same


def test_global_generators_are_restored(tmp_path):
    """Keras's unseeded ``keras.random`` ops and TF's global ``tf.random.Generator``, drawn by steps."""
    from keras.src.random.seed_generator import global_seed_generator

    class Noise(keras.layers.Layer):
        def call(self, x):
            keras_noise = keras.random.normal(keras.ops.shape(x), stddev=0.1)
            return x + keras_noise + tf.random.get_global_generator().normal(tf.shape(x), stddev=0.1)

    def fresh_process(seed):
        tf.random.set_global_generator(tf.random.Generator.from_seed(seed))
        global_seed_generator().state.assign([seed, 0])
        init = keras.initializers.GlorotUniform
        model = keras.Sequential(
            [keras.Input((4,)), Noise(), keras.layers.Dense(1, kernel_initializer=init(seed))]
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return model

    def fit(model, callbacks):
        x, y = data()
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)

    def states():
        return [np.array(tf.random.get_global_generator().state), np.array(global_seed_generator().state)]

    control = fresh_process(0)
    fit(control, [])
    expected = states()
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(fresh_process(0), [Interrupt(2, 6), BackupAndRestore(tmp_path / "b", save_freq=4)])
    resumed = fresh_process(7)
    fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=4)])
    assert_arrays_equal(resumed.get_weights(), control.get_weights())
    assert_arrays_equal(states(), expected)


def test_unbuilt_model_restores_before_the_input_draws_the_epoch_order(tmp_path):
    """Without ``keras.Input``, fit builds the model in its first step, after ``PyDataset.on_epoch_begin``
    drew the order: the restore builds it earlier, from the input's structure."""

    def model(seed):
        init = keras.initializers.GlorotUniform
        run = keras.Sequential(
            [
                keras.layers.Dense(8, activation="relu", kernel_initializer=init(seed)),
                keras.layers.Dropout(0.2, seed=seed),
                keras.layers.Dense(1, kernel_initializer=init(seed + 1000)),
            ]
        )
        run.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
        return run

    def fit(run, seed, callbacks):
        keras.utils.set_random_seed(seed)
        losses = Losses()
        run.fit(
            Reshuffled(*data(), BATCH), epochs=EPOCHS, shuffle=True, verbose=0, callbacks=[losses, *callbacks]
        )
        return losses.losses

    control = model(0)
    expected = fit(control, 0, [])
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(model(0), 0, [Interrupt(1, 6), BackupAndRestore(tmp_path / "b", save_freq=5)])
    assert Slot(tmp_path / "b").read_manifest().counters == Counters(1, 2, 10)
    resumed = model(1)
    assert not resumed.built
    losses = fit(resumed, 1, [BackupAndRestore(tmp_path / "b", save_freq=5)])
    assert losses == {epoch: expected[epoch] for epoch in (1, 2, 3)}  # loss and mae of the resumed epoch too
    assert_arrays_equal(resumed.get_weights(), control.get_weights())


def test_unidentified_input_still_resumes_and_is_warned_about(tmp_path, caplog, monkeypatch):
    """Where fit's input cannot be found, an unbuilt model is restored at its first step, with one warning."""
    control = plain.unbuilt_model()
    plain.fit(control, [])
    plain.interrupted(tmp_path / "b", plain.unbuilt_model(), at=(1, 6), save_freq=5)
    monkeypatch.setattr(pipeline, "inspect_fit_input", lambda: pipeline.UNKNOWN)
    resumed = plain.unbuilt_model(seed=7)
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        assert plain.fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=5)]) == [1, 2, 3]
    assert_arrays_equal(resumed.get_weights(), control.get_weights())
    (warning,) = keras_warnings(caplog)
    assert "could not be identified" in warning and "inside epoch 1" in warning


class OnEpochEnd(Reshuffled):
    def on_epoch_end(self):  # the classic keras.utils.Sequence idiom: the order lives in the object
        self.order = np.random.permutation(len(self.x))


def _generator():
    x, y = data()
    while True:
        for i in range(STEPS):
            yield x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]


def _tf_data(transform):
    def make():
        return (transform(tf.data.Dataset.from_tensor_slices(data())).batch(BATCH),)

    return make


@pytest.mark.parametrize(
    ("make_input", "fit_args", "exact", "phrase"),
    [
        (lambda: data(), {"batch_size": BATCH, "shuffle": False}, True, "arrays with shuffle=False"),
        (lambda: data(), {"batch_size": BATCH, "shuffle": True}, None, "arrays with shuffle=True"),
        (lambda: data(), {"batch_size": BATCH, "steps_per_epoch": 4}, False, "steps_per_epoch"),
        (lambda: (Reshuffled(*data(), BATCH),), {"shuffle": True}, True, "PyDataset (Reshuffled)"),
        (lambda: (OnEpochEnd(*data(), BATCH),), {}, False, "defines on_epoch_end()"),
        (lambda: (Reshuffled(*data(), BATCH),), {"workers": 2}, False, "2 worker(s)"),
        (lambda: (_generator(),), {"steps_per_epoch": STEPS, "shuffle": False}, False, "steps_per_epoch"),
        (_tf_data(lambda ds: ds), {}, True, "tf.data.Dataset"),
        (_tf_data(lambda ds: ds.shuffle(64, seed=1, reshuffle_each_iteration=False)), {}, True, "tf.data"),
        (_tf_data(lambda ds: ds.shuffle(64, seed=1)), {}, False, "reshuffle_each_iteration=True"),
        (_tf_data(lambda ds: ds.map(lambda x, y: (x + tf.random.uniform([4]), y))), {}, None, "tf.data"),
        (
            _tf_data(lambda ds: ds.map(lambda x, y: (x + GENERATOR.uniform([4]), y))),
            {},
            False,
            "tf.random.Generator",
        ),
    ],
    ids=[
        "arrays",
        "arrays-shuffled",
        "arrays-steps-per-epoch",
        "pydataset",
        "pydataset-on-epoch-end",
        "pydataset-workers",
        "generator",
        "tf-data",
        "tf-data-shuffled-once",
        "tf-data-reshuffled",
        "tf-data-legacy-random",
        "tf-data-generator",
    ],
)
def test_inputs_are_classified(make_input, fit_args, exact, phrase):
    """``exact``: True (reproduced), False (warned about), None (reproduced with the same global seed)."""

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.found = pipeline.inspect_fit_input()

    inputs, probe = make_input(), Probe()
    if "workers" in fit_args:
        inputs[0].workers, inputs[0].use_multiprocessing = fit_args.pop("workers"), False
    fit_args.setdefault("steps_per_epoch", None)
    fit_args.setdefault("shuffle", False)
    model = driver.new_run().model
    model.fit(*inputs, epochs=1, verbose=0, callbacks=[probe], **fit_args)
    found = probe.found
    text = f"{found.description} {found.problem}"
    assert phrase in text
    assert found.element_spec is not None
    if exact is None:
        assert found.seeded_by_tf and found.problem is None
        assert found.resume_problem(0, 0) is None and "is 1 now" in found.resume_problem(0, 1)
    else:
        assert (found.problem is None) is exact and not found.seeded_by_tf


GENERATOR = tf.random.Generator.from_seed(1)


@pytest.mark.parametrize(("reshuffle", "save_freq"), [(False, 3), (True, 3), (True, "epoch")])
def test_tf_data_resumes_exactly_unless_it_reshuffles(tmp_path, caplog, reshuffle, save_freq):
    def fit(model, callbacks):
        dataset = tf.data.Dataset.from_tensor_slices(data()).shuffle(
            64, seed=5, reshuffle_each_iteration=reshuffle
        )
        model.fit(dataset.batch(BATCH), epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)

    control = driver.new_run().model
    fit(control, [])
    with pytest.raises(RuntimeError, match="interrupt"):
        fit(driver.new_run().model, [Interrupt(2, 5), BackupAndRestore(tmp_path / "b", save_freq=save_freq)])
    resumed = driver.new_run(seed=1).model
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        fit(resumed, [BackupAndRestore(tmp_path / "b", save_freq=save_freq)])
    same = all(
        np.array_equal(a, e) for a, e in zip(resumed.get_weights(), control.get_weights(), strict=True)
    )
    if not reshuffle:
        assert same and not keras_warnings(caplog)
        return
    assert not same
    (warning,) = keras_warnings(caplog)
    assert "reshuffle_each_iteration=True" in warning and "README: 'Exact resume'" in warning
    if save_freq == "epoch":
        assert warning.startswith("Resuming at the start of epoch 2") and "reads every batch once" in warning
    else:
        assert (
            warning.startswith("Resuming inside epoch 2: its first 5 batch(es)")
            and "trained twice" in warning
        )


def test_a_backup_without_its_rng_and_metric_state_is_refused(tmp_path):
    model = driver.new_run().model
    model.fit(*data(), batch_size=BATCH, epochs=1, verbose=0)
    state = KerasTrainingState(model)
    state.save(tmp_path, Position.epoch_end(1, STEPS), SingleProcess())
    manifest = Manifest("keras", "x", 1, 0, STEPS, {}, {}, "payload-x")
    state.load(tmp_path, manifest, SingleProcess())
    (tmp_path / EXTRA_FILE).unlink()
    with pytest.raises(CorruptBackupError, match=EXTRA_FILE):
        state.load(tmp_path, manifest, SingleProcess())
