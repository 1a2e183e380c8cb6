"""Guards on the Keras and TensorFlow internals that ``keras_impl/_private.py`` relies on.

When one of these fails after an upgrade, read its message, then update ``_private.py``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_impl import _private
from tests.conformance.keras_driver import BATCH, KerasDriver, data

pytestmark = pytest.mark.keras

CHANGED = "CHANGED: Keras or TensorFlow changed an internal that keras_impl/_private.py uses: "
STEPS = 8


def new_model(**run_args: Any) -> keras.Model:
    return KerasDriver().new_run(**run_args).model


def unbuilt_model() -> keras.Model:
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


class Probe(keras.callbacks.Callback):
    """Runs ``at_begin(callback)`` in ``on_train_begin`` and records the epochs begun."""

    def __init__(self, at_begin: Any = None) -> None:
        super().__init__()
        self.at_begin, self.epochs, self.found = at_begin, [], None

    def on_train_begin(self, logs: Any = None) -> None:
        if self.at_begin is not None:
            self.found = self.at_begin(self)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)


def fit(model: keras.Model, probe: Probe, epochs: int = 2, x: Any = None, **kwargs: Any) -> Probe:
    inputs = {"x": x} if x is not None else dict(zip(("x", "y"), data(), strict=True)) | {"batch_size": BATCH}
    model.fit(**inputs, epochs=epochs, verbose=0, callbacks=[probe], **kwargs)
    return probe


def test_initial_epoch_is_read_after_on_train_begin_and_zero_wins_over_the_users():
    probe = fit(new_model(), Probe(lambda cb: _private.set_initial_epoch(cb.model, 2)), epochs=4)
    assert probe.epochs == [2, 3], (
        CHANGED + "fit no longer starts at model._initial_epoch set in on_train_begin"
    )
    model = new_model()
    probe = fit(model, Probe(lambda cb: _private.set_initial_epoch(cb.model, 0)), epochs=3, initial_epoch=2)
    assert probe.epochs == [0, 1, 2], CHANGED + "fit reads _initial_epoch otherwise (0 must win)"
    _private.set_initial_epoch(model, None)
    assert fit(model, Probe(), epochs=1).epochs == [0], CHANGED + "_initial_epoch=None does not reset it"


def test_an_unbuilt_model_is_built_from_the_running_fits_input():
    def build(callback: Probe) -> Any:
        iterator = _private.fit_epoch_iterator()
        assert iterator is not None, CHANGED + "fit has no 'epoch_iterator' local with a data_adapter"
        spec = _private.element_spec(iterator)
        assert spec is not None, CHANGED + "EpochIterator._distributed_dataset.element_spec is gone"
        assert not callback.model.built
        _private.build_from_spec(callback.model, spec)
        return callback.model.built, _private.compiled_metrics_built(callback.model)

    model = unbuilt_model()
    probe = fit(model, Probe(build), epochs=1)
    assert probe.found[0], CHANGED + "Model._symbolic_build(data_batch=...) no longer builds the model"
    assert _private.compiled_metrics_built(model), CHANGED + "Model._compile_metrics.built is gone"


def test_the_train_function_is_read_at_every_step():
    calls: list[int] = []

    def wrap(callback: Probe) -> None:
        original = _private.train_function(callback.model)

        def counted(iterator: Any) -> Any:
            calls.append(1)
            return original(iterator)

        _private.set_train_function(callback.model, counted)

    fit(new_model(), Probe(wrap), epochs=1)
    assert len(calls) == STEPS, CHANGED + "fit no longer calls model.train_function once per step"


def test_the_optimizer_counts_batches_apart_from_steps_under_gradient_accumulation():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-2, gradient_accumulation_steps=2), loss="mse")
    fit(model, Probe(), epochs=1)
    assert int(model.optimizer.iterations) == STEPS // 2
    assert _private.batches_trained(model.optimizer) == STEPS, CHANGED + "Optimizer._iterations is gone"


def test_global_random_number_generators_are_found_without_being_created():
    generator = _private.make_keras_global_seed_generator()
    assert _private.keras_global_seed_generator() is generator, (
        CHANGED + "keras.src.backend.common.global_state no longer holds 'global_seed_generator'"
    )
    tf.random.set_global_generator(tf.random.Generator.from_seed(3))
    assert _private.tf_global_generator() is tf.random.get_global_generator(), (
        CHANGED + "tensorflow.python.ops.stateful_random_ops.global_generator is gone"
    )
    tf.random.set_seed(123)
    try:
        assert _private.tf_global_seed() == 123, CHANGED + "tensorflow.python.eager.context.global_seed()"
    finally:
        tf.random.set_seed(None)
    assert _private.tf_global_seed() is None


def test_the_running_fit_is_found_on_the_stack():
    def code(callback: Probe) -> Any:
        found = _private.fit_code(callback)
        return found, found is not None and _private.fit_is_running(found, callback)

    probe = fit(new_model(), Probe(code), epochs=1)
    found, running = probe.found
    assert found is not None and running, CHANGED + "fit's frame no longer has 'self' and 'callbacks' locals"
    assert not _private.fit_is_running(found, probe)


def test_input_adapters_expose_what_the_pipeline_check_reads():
    seen = fit(new_model(), Probe(lambda cb: _private.fit_epoch_iterator()), epochs=1, shuffle=True).found
    assert _private.array_shuffle(seen.data_adapter) is True, CHANGED + "ArrayDataAdapter._shuffle is gone"
    x, y = data()
    source = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = source.shuffle(64, seed=1).batch(BATCH)
    seen = fit(
        new_model(), Probe(lambda cb: _private.fit_epoch_iterator()), epochs=1, x=dataset, shuffle=False
    ).found
    assert _private.adapted_dataset(seen.data_adapter) is dataset, CHANGED + "TFDatasetAdapter._dataset"
    (shuffled,) = _private.dataset_inputs(dataset)
    assert _private.reshuffles_each_iteration(shuffled), CHANGED + "_reshuffle_each_iteration is gone"
    fixed = source.shuffle(64, seed=1, reshuffle_each_iteration=False)
    assert not _private.reshuffles_each_iteration(fixed)
    assert _private.dataset_inputs(fixed) == [source], CHANGED + "Dataset._inputs() is gone"
    assert np.asarray(list(source.take(1))[0][0]).shape == (4,)
