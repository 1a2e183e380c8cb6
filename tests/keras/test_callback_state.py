"""The other callbacks' state in a Keras backup (keras_impl/callback_state.py): the built-ins' and a
user's, through ``state_dict()`` / ``load_state_dict(state)``."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from keras_impl import BackupAndRestore, callback_state
from tests.conformance.keras_driver import BATCH, KerasDriver, TfKerasDriver, data
from unified_backup import InvalidArgumentError, Slot

DRIVERS = {"keras": KerasDriver, "tf_keras": TfKerasDriver}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest) -> Any:
    request.applymarker(getattr(pytest.mark, request.param))
    return DRIVERS[request.param]()


def counter_class(K: Any) -> type:
    class BatchCounter(K.callbacks.Callback):
        """Counts the batches trained; its count takes part in the backup through the protocol."""

        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.batches += 1

        def state_dict(self) -> dict[str, Any]:
            return {"batches": self.batches}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.batches = state["batches"]

    return BatchCounter


def interrupter(K: Any, at: tuple[int, int]) -> Any:
    class Interrupt(K.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if (self.epoch, batch) == at:
                raise RuntimeError("interrupt")

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

    return Interrupt()


def fit(driver: Any, model: Any, callbacks: list[Any], epochs: int = 4) -> BaseException | None:
    x, y = data()
    try:
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    except RuntimeError as exc:
        for callback in callbacks:
            if isinstance(callback, BackupAndRestore):
                callback.release()
        return exc
    return None


@pytest.mark.parametrize(("save_freq", "backed_up"), [("epoch", 16), (5, 15)], ids=["epoch", "step"])
def test_a_users_callback_carries_its_state_through_the_protocol(driver, tmp_path, save_freq, backed_up):
    """At a step backup (15 steps: epoch 1, 7 batches in), the resumed fit reads those 7 batches again
    without calling any batch hook: the counter goes on from 15 and counts each batch once."""
    K, Counter = driver.K, counter_class(driver.K)
    first = Counter()
    callbacks = [interrupter(K, (2, 3)), first, BackupAndRestore(tmp_path, save_freq=save_freq)]
    error = fit(driver, driver.new_run().model, callbacks)
    assert str(error) == "interrupt" and first.batches == 2 * 8 + 3
    payload = Slot(tmp_path).payload_dir(Slot(tmp_path).read_manifest())
    assert json.loads((payload / callback_state.FILE).read_text()) == {"BatchCounter": {"batches": backed_up}}
    second = Counter()
    assert (
        fit(driver, driver.new_run().model, [second, BackupAndRestore(tmp_path, save_freq=save_freq)]) is None
    )
    assert second.batches == 4 * 8  # the backup's count, then the batches after it: as if never interrupted


def test_callbacks_of_one_class_get_their_own_state_by_what_they_monitor(driver, tmp_path):
    """Two EarlyStopping listed in the other order after the restart: each gets its own wait count."""
    K = driver.K

    def stoppers() -> tuple[Any, Any]:
        quick = K.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=9)  # never improves
        slow = K.callbacks.EarlyStopping(monitor="mse", patience=9)  # improves every epoch
        return quick, slow

    quick, slow = stoppers()
    run = driver.new_run().model
    run.compile(optimizer="adam", loss="mse", metrics=["mse"])
    assert fit(driver, run, [interrupter(K, (2, 3)), quick, slow, BackupAndRestore(tmp_path)])
    assert (quick.wait, slow.wait) == (1, 0)
    payload = Slot(tmp_path).payload_dir(Slot(tmp_path).read_manifest())
    keys = sorted(json.loads((payload / callback_state.FILE).read_text()))
    assert len(keys) == 2 and all(key.startswith("EarlyStopping{'monitor': ") for key in keys), keys
    quick, slow = stoppers()
    resumed = driver.new_run().model
    resumed.compile(optimizer="adam", loss="mse", metrics=["mse"])

    class Probe(K.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.waits = getattr(self, "waits", None) or (quick.wait, slow.wait)

    probe = Probe()
    assert fit(driver, resumed, [slow, quick, probe, BackupAndRestore(tmp_path)], epochs=3) is None
    assert probe.waits == (1, 0)  # not swapped


def test_a_best_only_checkpoints_best_score_is_carried(driver, tmp_path):
    K = driver.K
    checkpoint = K.callbacks.ModelCheckpoint(
        str(tmp_path / "best.weights.h5"), monitor="loss", save_best_only=True, save_weights_only=True
    )
    assert fit(
        driver, driver.new_run().model, [interrupter(K, (2, 3)), checkpoint, BackupAndRestore(tmp_path / "b")]
    )
    best = float(checkpoint.best)
    fresh = K.callbacks.ModelCheckpoint(
        str(tmp_path / "best.weights.h5"), monitor="loss", save_best_only=True, save_weights_only=True
    )

    class Probe(K.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.seen = getattr(self, "seen", None) or float(fresh.best)

    probe = Probe()
    assert fit(driver, driver.new_run().model, [fresh, probe, BackupAndRestore(tmp_path / "b")]) is None
    assert probe.seen == best  # before the resumed epoch trained, the best score was the backup's


def test_a_state_that_is_not_json_is_refused_naming_the_callback(driver, tmp_path):
    class Bad(counter_class(driver.K)):  # type: ignore[misc]
        def state_dict(self) -> dict[str, Any]:
            return {"batches": object()}

    x, y = data()
    with pytest.raises(InvalidArgumentError, match=r"Bad.state_dict\(\) returned .*which is not JSON"):
        driver.new_run().model.fit(
            x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[Bad(), BackupAndRestore(tmp_path)]
        )


def test_a_callback_the_fit_no_longer_has_is_named_and_ignored(driver, tmp_path, caplog):
    K = driver.K
    assert fit(
        driver,
        driver.new_run().model,
        [interrupter(K, (2, 3)), counter_class(K)(), BackupAndRestore(tmp_path)],
    )
    with caplog.at_level(logging.WARNING, logger="keras_impl"):
        assert fit(driver, driver.new_run().model, [BackupAndRestore(tmp_path)]) is None
    assert "holds the state of a callback BatchCounter that this fit does not have: ignored" in caplog.text


def test_a_state_key_names_a_users_callback_as_in_lightning(driver, tmp_path):
    Counter = counter_class(driver.K)

    class Keyed(Counter):  # type: ignore[misc,valid-type]
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        @property
        def state_key(self) -> str:
            return f"Counter[{self.key}]"

    first, other = Keyed("a"), Keyed("b")
    other.batches = 100
    callbacks = [interrupter(driver.K, (2, 3)), first, other, BackupAndRestore(tmp_path)]
    assert fit(driver, driver.new_run().model, callbacks)
    payload = Slot(tmp_path).payload_dir(Slot(tmp_path).read_manifest())
    states = json.loads((payload / callback_state.FILE).read_text())
    assert states == {"Counter[a]": {"batches": 16}, "Counter[b]": {"batches": 116}}
    second, second_other = Keyed("a"), Keyed("b")
    assert fit(driver, driver.new_run().model, [second_other, second, BackupAndRestore(tmp_path)]) is None
    assert (second.batches, second_other.batches) == (32, 132)
