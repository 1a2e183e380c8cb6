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


# -- tf_keras ----------------------------------------------------------------------------------------

TF_KERAS_CHANGED = "CHANGED: tf_keras changed an internal that keras_impl/_private.py uses: "


def tf_keras_fit(model: Any, at_begin: Any, epochs: int = 2, x: Any = None, **kwargs: Any) -> Any:
    """Fit a tf_keras model with a probe that runs ``at_begin(callback)`` in ``on_train_begin``."""
    import tf_keras

    class TfKerasProbe(Probe, tf_keras.callbacks.Callback):
        pass

    probe = TfKerasProbe(at_begin)
    inputs = {"x": x} if x is not None else dict(zip(("x", "y"), data(), strict=True)) | {"batch_size": BATCH}
    model.fit(**inputs, epochs=epochs, verbose=0, callbacks=[probe], **kwargs)
    return probe


def tf_keras_model(**dropout: Any) -> Any:
    pytest.importorskip("tf_keras")
    from tests.conformance.keras_driver import TfKerasDriver

    return TfKerasDriver().new_run(dropout=0.2 if dropout else 0.0).model


@pytest.mark.tf_keras
def test_tf_keras_asks_every_callback_for_the_hooks_it_implements():
    import tf_keras

    for name in (
        "_implements_train_batch_hooks",
        "_implements_test_batch_hooks",
        "_implements_predict_batch_hooks",
    ):
        assert hasattr(tf_keras.callbacks.Callback, name), TF_KERAS_CHANGED + f"Callback.{name} is gone"
        assert getattr(_private.TfKerasHooks, name)(None) is (name == "_implements_train_batch_hooks")
    assert hasattr(tf_keras.callbacks.Callback(), "_supports_tf_logs"), TF_KERAS_CHANGED + "_supports_tf_logs"


@pytest.mark.tf_keras
def test_tf_keras_fit_starts_where_the_training_state_says_and_forgets_it():
    model = tf_keras_model()
    probe = tf_keras_fit(model, lambda cb: _private.set_tf_keras_initial_epoch(cb.model, 2), epochs=4)
    assert probe.epochs == [2, 3], TF_KERAS_CHANGED + "fit no longer asks model._training_state for its start"
    assert tf_keras_fit(model, None, epochs=4).epochs == [2, 3]  # tf_keras never resets it: we must
    _private.set_tf_keras_initial_epoch(model, None)
    assert tf_keras_fit(model, None, epochs=1).epochs == [0], TF_KERAS_CHANGED + "_training_state=None"


@pytest.mark.tf_keras
def test_tf_keras_reads_the_train_function_at_every_step():
    calls: list[int] = []

    def wrap(callback: Probe) -> None:
        original = _private.train_function(callback.model)
        _private.set_train_function(callback.model, lambda iterator: calls.append(1) or original(iterator))

    tf_keras_fit(tf_keras_model(), wrap, epochs=1)
    assert len(calls) == STEPS, TF_KERAS_CHANGED + "fit no longer calls model.train_function once per step"


@pytest.mark.tf_keras
def test_tf_keras_data_handler_exposes_what_the_pipeline_check_reads():
    import tf_keras

    def look(callback: Probe) -> Any:
        handler, args = _private.fit_data_handler()
        assert handler is not None, TF_KERAS_CHANGED + "fit has no 'data_handler' local with an _adapter"
        adapter = _private.handler_adapter(handler)
        return type(adapter).__name__, adapter, handler, args

    kind, adapter, handler, args = tf_keras_fit(
        tf_keras_model(), look, epochs=1, shuffle=True, initial_epoch=0
    ).found
    assert kind == "TensorLikeDataAdapter" and _private.tensor_like_shuffle(adapter) is True
    assert _private.handler_first_epoch(handler) == 0 and "workers" in args
    assert _private.handler_element_spec(handler) is not None, TF_KERAS_CHANGED + "DataHandler._dataset"

    class Batches(tf_keras.utils.Sequence):
        def __len__(self) -> int:
            return STEPS

        def __getitem__(self, index: int) -> Any:
            x, y = data()
            return x[index * BATCH : (index + 1) * BATCH], y[index * BATCH : (index + 1) * BATCH]

    sequence = Batches()
    kind, adapter, _, _ = tf_keras_fit(tf_keras_model(), look, epochs=1, x=sequence, shuffle=True).found
    assert kind == "KerasSequenceAdapter" and _private.sequence_of(adapter) == (sequence, True)
    dataset = tf.data.Dataset.from_tensor_slices(data()).batch(BATCH)
    kind, adapter, _, _ = tf_keras_fit(tf_keras_model(), look, epochs=1, x=dataset).found
    assert kind == "DatasetAdapter" and _private.tf_keras_dataset(adapter) is dataset


@pytest.mark.tf_keras
def test_tf_keras_layer_generators_and_optimizer_slots_are_reachable():
    import tf_keras

    model = tf_keras.Sequential([
        tf_keras.Input((4,)), tf_keras.layers.Dropout(0.2, rng_type="stateful", name="stateful"),
        tf_keras.layers.Dropout(0.2, name="legacy"), tf_keras.layers.Dense(1),
    ])  # fmt: skip
    found = {name: (kind, generator) for name, kind, generator in _private.layer_generators(model)}
    assert found["stateful"][0] == "stateful" and isinstance(found["stateful"][1], tf.random.Generator), (
        TF_KERAS_CHANGED + "Layer._random_generator._generator is gone"
    )
    assert found["legacy"] == ("legacy_stateful", None)
    optimizer = tf_keras.optimizers.legacy.Adam()
    _private.build_legacy_optimizer(optimizer, model.trainable_variables)
    assert len(optimizer.variables()) == 1 + 2 * len(model.trainable_variables), (
        TF_KERAS_CHANGED + "OptimizerV2._create_all_weights no longer makes the slots"
    )


@pytest.mark.tf_keras
def test_tf_keras_compiled_metrics_are_built_from_one_batchs_structure():
    model = tf_keras_model()
    assert not _private.tf_keras_compiled_metrics_built(model)
    spec = tuple(tf.TensorSpec((None, *a.shape[1:]), tf.float32) for a in data())
    _private.build_tf_keras_compiled_metrics(model, spec)
    assert _private.tf_keras_compiled_metrics_built(model), TF_KERAS_CHANGED + "compiled_loss.build(y_pred)"
    assert [m.name for m in model.metrics] == ["loss"]


def test_parameter_server_strategy_keeps_its_cluster_resolver_where_private_reads_it():
    import inspect

    from tensorflow.python.distribute import parameter_server_strategy_v2

    source = inspect.getsource(parameter_server_strategy_v2.ParameterServerStrategyV2.__init__)
    assert "self._cluster_resolver = cluster_resolver" in source, (
        CHANGED + "ParameterServerStrategy's resolver"
    )
    assert (
        tf.distribute.experimental.ParameterServerStrategy
        is parameter_server_strategy_v2.ParameterServerStrategyV2
    )
    # the public property reads it from `extended`, where PSS keeps none (hence the private read)
    assert "self.extended" in inspect.getsource(tf.distribute.Strategy.cluster_resolver.fget), CHANGED


def test_messages_print_as_keras_callbacks_print_theirs(capsys):
    _private.print_msg("a line from unified-backup")
    shown = capsys.readouterr().out
    assert shown == "a line from unified-backup\n", CHANGED + "keras.src.utils.io_utils.print_msg"


@pytest.mark.tf_keras
def test_tf_keras_messages_print_as_its_callbacks_print_theirs(capsys):
    pytest.importorskip("tf_keras")
    _private.print_msg("a line from unified-backup", tf_keras=True)
    assert capsys.readouterr().out == "a line from unified-backup\n", (
        TF_KERAS_CHANGED + "tf_keras.src.utils.io_utils.print_msg"
    )


def test_a_callback_moved_last_runs_after_the_others_from_the_next_hook_on():
    order: list[str] = []

    class Named(keras.callbacks.Callback):
        def __init__(self, name: str, move: bool = False) -> None:
            super().__init__()
            self.name, self.move = name, move

        def on_train_begin(self, logs: Any = None) -> None:
            order.append(f"begin {self.name}")
            if self.move:
                _private.run_last(self)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            order.append(f"end {self.name}")

    x, y = data()
    new_model().fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[Named("a", True), Named("b")])
    assert order == ["begin a", "begin b", "end b", "end a"], (
        CHANGED + "CallbackList.callbacks is not read per hook"
    )


@pytest.mark.parametrize("flavour", ["keras", pytest.param("tf_keras", marks=pytest.mark.tf_keras)])
def test_a_fits_batch_hooks_can_be_held_on_its_callback_list_and_given_back(flavour):
    K = keras if flavour == "keras" else pytest.importorskip("tf_keras")
    changed = CHANGED if flavour == "keras" else TF_KERAS_CHANGED
    held: list[tuple[str, int]] = []
    seen: list[tuple[str, int]] = []

    class Holder(K.callbacks.Callback):  # type: ignore[misc,name-defined]
        def on_train_begin(self, logs: Any = None) -> None:
            self.callback_list = _private.fit_callback_list(self)
            self.hooks = _private.HeldTrainBatchHooks(
                self.callback_list,
                lambda batch, logs=None: held.append(("begin", batch)),
                lambda batch, logs=None: held.append(("end", batch)),
            )

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(("begin", batch))

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            seen.append(("end", batch))

    model = new_model() if flavour == "keras" else tf_keras_model()
    x, y = data()
    holder = Holder()
    model.fit(x[: 2 * BATCH], y[: 2 * BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=[holder])
    assert held == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1)], (
        changed + "fit no longer calls the batch hooks through its CallbackList object"
    )
    assert seen == []
    holder.hooks.own_begin(7)
    holder.hooks.own_end(7)
    assert seen == [("begin", 7), ("end", 7)], changed + "CallbackList's batch hook methods"
    holder.hooks.release()
    holder.callback_list.on_train_batch_begin(8)
    assert seen[-1] == ("begin", 8) and len(held) == 4
    assert not any(name.startswith("on_train_batch") for name in vars(holder.callback_list))


@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_a_frozen_checkpoint_writes_the_same_keys_and_values_as_the_live_one_as_it_was(tmp_path, flavour):
    """frozen_checkpoint walks Trackable._trackable_children / _serialize_to_tensors (async_backup)."""
    kit = keras
    if flavour == "tf_keras":
        import tf_keras as kit
    model = kit.Sequential([kit.Input((4,)), kit.layers.Dense(8), kit.layers.Dense(1)])
    model.compile(optimizer=kit.optimizers.Adam(), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    model.fit(x, y, verbose=0)
    live = tf.train.Checkpoint(model=model, optimizer=model.optimizer, variables=list(model.variables))
    expected = tf.train.CheckpointManager(live, str(tmp_path / "live"), max_to_keep=1).save()
    frozen = _private.frozen_checkpoint(live)
    model.fit(x, y, verbose=0)  # the live variables move on
    written = tf.train.CheckpointManager(frozen, str(tmp_path / "frozen"), max_to_keep=1).save()
    keys = dict(tf.train.list_variables(expected))
    assert dict(tf.train.list_variables(written)) == keys, (
        CHANGED + "a frozen checkpoint no longer has the live one's object graph"
    )
    for key in keys:
        if key != "save_counter/.ATTRIBUTES/VARIABLE_VALUE" and not key.startswith("_CHECKPOINTABLE"):
            np.testing.assert_array_equal(
                tf.train.load_variable(written, key), tf.train.load_variable(expected, key), err_msg=key
            )


@pytest.mark.tf_keras
def test_a_legacy_optimizers_slot_variables_refuse_a_frozen_checkpoint():
    import tf_keras

    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1)])
    optimizer = tf_keras.optimizers.legacy.Adam()
    _private.build_legacy_optimizer(optimizer, model.trainable_variables)
    with pytest.raises(TypeError, match="slot variables"):
        _private.frozen_checkpoint(tf.train.Checkpoint(model=model, optimizer=optimizer))
