"""Exact resume on a real Lightning Trainer: an interrupted run ends bit-identical to an uninterrupted one.

Each scenario trains a reference without BackupAndRestore (so adding the callback must not change
the run either), then the same configuration interrupted one or more times, each restart a new
model built with another seed (the restore must override weights and every random-number state).
Weights, optimizer state tensors, the step counter, the learning rate and the epoch-end logged
values are compared value for value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from lightning_impl.rng import rng_state, set_rng_state
from tests.lightning.helpers import fit, new_model
from unified_backup import Slot
from unified_backup.manifest import FileEntry

pytestmark = pytest.mark.lightning
EPOCHS = 4
LOGGED = ("train_loss", "train_loss_max", "train_loss_sum")


class EpochEndValues(L.Callback):
    """The epoch-aggregated logged values each epoch ended with, as a monitoring callback reads them."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, float]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.values[trainer.current_epoch] = {name: float(metrics[name]) for name in LOGGED}


def outcome(model: Any, trainer: Any) -> dict[str, Any]:
    optimizer = trainer.optimizers[0]
    state = [t for param in optimizer.state.values() for _, t in sorted(param.items())]
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict() if trainer.lr_scheduler_configs else {}
    scheduler.pop("_get_lr_called_within_step", None)
    return {
        "weights": list(model.net.state_dict().values()),
        "optimizer": state,
        "global_step": trainer.global_step,
        "lr": optimizer.param_groups[0]["lr"],
        "scheduler": scheduler,
    }


def assert_identical(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("weights", "optimizer"):
        assert len(actual[key]) == len(expected[key]) > 0, key
        for i, (a, e) in enumerate(zip(actual[key], expected[key], strict=True)):
            assert torch.equal(a, e), f"{key}[{i}] differs: {a} != {e}"
    assert actual["global_step"] == expected["global_step"]
    assert actual["lr"] == expected["lr"] and actual["scheduler"] == expected["scheduler"]


def reference(model_kwargs: dict[str, Any], **trainer_kwargs: Any) -> tuple[dict[str, Any], dict]:
    model, values = new_model(**model_kwargs), EpochEndValues()
    namespace = model_kwargs.get("namespace", "lightning.pytorch")
    result = fit(model, None, epochs=EPOCHS, callbacks=[values], namespace=namespace, **trainer_kwargs)
    assert result.error is None, repr(result.error)
    assert sorted(values.values) == list(range(EPOCHS))
    return outcome(model, result.trainer), values.values


def interrupted(
    backup_dir: Path, model_kwargs: dict[str, Any], save_freq: Any, interrupts: list, **trainer_kwargs: Any
) -> tuple[dict[str, Any], dict, list[Any]]:
    """The same training, interrupted before each (epoch, batch) in turn, then run to its end."""
    values: dict[int, dict[str, float]] = {}
    fits = []
    for seed, point in enumerate([*interrupts, None]):
        model, recorder = new_model(**{**model_kwargs, "seed": seed}), EpochEndValues()
        result = fit(
            model,
            backup_dir,
            epochs=EPOCHS,
            namespace=model_kwargs.get("namespace", "lightning.pytorch"),
            save_freq=save_freq,
            interrupt=point,
            callbacks=[recorder],
            **trainer_kwargs,
        )
        values.update(recorder.values)
        fits.append((result, model, Slot(backup_dir).read_manifest()))
        if point is None:
            assert result.error is None, repr(result.error)
        else:
            assert isinstance(result.error, RuntimeError) and str(result.error) == "interrupt"
    assert not backup_dir.exists()
    return outcome(model, result.trainer), values, fits


CASES = {
    # loader kind, save_freq, interrupts (epoch, batch); shuffled data and dropout 0.2 in every case
    "epoch-end": ("plain", "epoch", [(1, 3)]),
    "three-steps": ("plain", 3, [(0, 5), (1, 2), (2, 7)]),  # in the first epoch of a fit, and later ones
    "generator": ("generator", 2, [(0, 5), (2, 3)]),
    "noisy": ("noisy", 2, [(0, 5), (2, 3)]),
    "workers": ("workers", 2, [(0, 5), (2, 3)]),
    "distributed-sampler": ("distributed", 3, [(2, 4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_run_ends_bit_identical(case, tmp_path, caplog):
    loader, save_freq, interrupts = CASES[case]
    namespace = "pytorch_lightning" if case == "three-steps" else "lightning.pytorch"  # both namespaces
    model_kwargs = {"shuffle": True, "dropout": 0.2, "loader": loader, "namespace": namespace}
    expected, expected_values = reference(model_kwargs)
    filters = list(warnings.filters)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual, values, fits = interrupted(tmp_path / "b", model_kwargs, save_freq, interrupts)
    assert_identical(actual, expected)
    assert values == expected_values  # the epoch-end mean, max and sum of every epoch, resumed ones included
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning_impl")]
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]
    assert warnings.filters == filters  # the positioned resume left no filter behind
    if save_freq != "epoch":
        for (_, _, manifest), (_, model, _) in zip(fits, fits[1:], strict=False):
            # each restart trains first the batch after the backup: none replayed, none skipped
            assert model.seen[0] == (manifest.epoch, manifest.step_in_epoch)
            assert manifest.step_in_epoch > 0


def test_three_interruptions_with_gradient_accumulation_and_a_per_step_lr_schedule(tmp_path):
    model_kwargs = {"shuffle": True, "dropout": 0.2, "scheduler": "exponential"}
    expected, expected_values = reference(model_kwargs, accumulate_grad_batches=3)
    assert expected["global_step"] == EPOCHS * 3  # 8 batches: optimizer steps after batches 2, 5 and 7
    actual, values, fits = interrupted(
        tmp_path / "b", model_kwargs, 2, [(1, 7), (2, 4), (3, 1)], accumulate_grad_batches=3
    )
    assert_identical(actual, expected)
    assert values == expected_values
    assert actual["lr"] == pytest.approx(1e-2 * 0.9 ** (EPOCHS * 3 / 4))  # stepped once per optimizer step
    counters = [(m.epoch, m.step_in_epoch, m.global_step) for _, _, m in fits[:-1]]
    # backups every 2 optimizer steps; the one due at an epoch's last batch waits for the epoch's end
    assert counters == [(1, 1, 4), (2, 0, 6), (2, 2, 8)]
    first_batches = [model.seen[0] for _, model, _ in fits[1:]]
    assert first_batches == [(1, 3), (2, 0), (2, 6)]  # the batch after each backup's optimizer step


def test_a_step_backup_due_right_before_a_validation_is_taken_after_it(tmp_path):
    # Lightning resumes a checkpoint from on_train_batch_end as if the validation after it had run
    model_kwargs = {"shuffle": True, "dropout": 0.2, "validate": True}
    expected, expected_values = reference(model_kwargs, val_check_interval=0.5)  # after batches 3 and 7
    actual, values, fits = interrupted(
        tmp_path / "b", model_kwargs, 4, [(1, 5), (2, 1)], val_check_interval=0.5
    )
    assert_identical(actual, expected)
    assert values == expected_values
    assert [m.global_step for _, _, m in fits[:-1]] == [12, 16]  # step 12: after batch 3 of epoch 1
    assert [model.seen[0] for _, model, _ in fits[1:]] == [(1, 4), (2, 0)]


def test_stateful_dataloader_is_positioned_by_lightning_and_ends_bit_identical(tmp_path, caplog):
    import torchdata.stateful_dataloader  # noqa: F401  (in [test]: the README's claim is tested, never skipped)

    model_kwargs = {"shuffle": True, "dropout": 0.2, "loader": "stateful"}
    expected, expected_values = reference(model_kwargs)
    for save_freq, interrupts in (("epoch", [(2, 3)]), (3, [(0, 5), (2, 3)])):
        with caplog.at_level(logging.WARNING, logger="lightning_impl"):
            actual, values, _ = interrupted(tmp_path / str(save_freq), model_kwargs, save_freq, interrupts)
        assert_identical(actual, expected)
        assert values == expected_values
    assert not [r for r in caplog.records if r.name.startswith("lightning_impl")]


@pytest.mark.parametrize("save_freq", ["epoch", 3])
def test_a_loader_that_cannot_be_positioned_is_named_once_at_restore(save_freq, tmp_path, caplog):
    model_kwargs = {"dropout": 0.2, "loader": "stream"}
    expected, _ = reference(model_kwargs)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        actual, _, _ = interrupted(tmp_path / "b", model_kwargs, save_freq, [(1, 5)])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_impl")]
    if save_freq == "epoch":  # an epoch is read again from its start: exact for this loader too
        assert not messages
        assert_identical(actual, expected)
    else:
        assert len(messages) == 1, messages
        assert "Resuming in the middle of epoch 1, after 4 of its batches" in messages[0]
        assert "cannot be positioned" in messages[0] and "StreamDataset" in messages[0]
        assert "trained on again" in messages[0] and "save_freq='epoch'" in messages[0]


def test_persistent_workers_resume_warns_that_worker_random_states_are_not_restored(tmp_path, caplog):
    model_kwargs = {"shuffle": True, "dropout": 0.2, "loader": "persistent"}
    expected, expected_values = reference(model_kwargs)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        actual, values, _ = interrupted(tmp_path / "b", model_kwargs, "epoch", [(2, 3)])
    assert_identical(actual, expected)  # this dataset draws no random numbers in its workers
    assert values == expected_values
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_impl")]
    assert len(messages) == 1 and "persistent_workers=True" in messages[0], messages


def test_backup_holds_every_process_random_states_and_loads_weights_only(tmp_path):
    result = fit(
        new_model(shuffle=True, dropout=0.2), tmp_path / "b", epochs=3, save_freq=3, interrupt=(1, 5)
    )
    assert result.error is not None
    slot = Slot(tmp_path / "b")
    manifest = slot.read_manifest()
    checkpoint = torch.load(slot.payload_dir(manifest) / "state.ckpt", weights_only=True)
    entry = checkpoint["unified_backup"]
    assert entry["batches"] == 4 and len(entry["ranks"]) == 1  # after step 12: batch 3 of epoch 1
    mine = entry["ranks"][0]
    assert mine["epoch_start"]["mode"] == "epoch" and mine["epoch_start"]["generators"] == []
    for state in (mine["epoch_start"]["rng"], mine["rng"]):
        assert set(state) == {"torch", "numpy", "python"}  # and "cuda" once CUDA is initialised
        assert state["torch"].dtype == torch.uint8 and state["numpy"]["keys"].shape == (624,)
    assert not torch.equal(mine["rng"]["torch"], mine["epoch_start"]["rng"]["torch"])  # dropout drew since
    assert set(mine["aggregates"]) == {f"training_step.{name}" for name in LOGGED}
    assert mine["aggregates"]["training_step.train_loss"]["cumulated_batch_size"] == 4 * 8


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state ...
    random.gauss(0, 1)  # ... and in Python's
    torch.save(rng_state(), tmp_path / "rng.pt")

    def draws() -> tuple[Any, ...]:
        return torch.rand(5).tolist(), np.random.normal(size=3).tolist(), random.gauss(0, 1), random.random()

    expected = draws()
    torch.manual_seed(4)
    np.random.seed(4)
    random.seed(4)
    assert draws() != expected
    assert set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)) is None
    assert draws() == expected


def rewrite_backup(backup_dir: Path, change: Callable[[dict], None]) -> None:
    """Edit the committed checkpoint in place and re-seal the manifest, as a backup written so would be."""
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    path = slot.payload_dir(manifest) / "state.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    data = path.read_bytes()
    entry = FileEntry(len(data), hashlib.sha256(data).hexdigest())
    slot.manifest_path.write_text(dataclasses.replace(manifest, files={"state.ckpt": entry}).to_json())


@pytest.mark.parametrize("change", ["no-rng", "other-world-size"])
def test_a_backup_whose_random_states_do_not_fit_resumes_with_a_warning(change, tmp_path, caplog):
    model_kwargs = {"shuffle": True, "dropout": 0.2}
    assert fit(new_model(**model_kwargs), tmp_path / "b", epochs=3, interrupt=(2, 1)).error is not None

    def edit(checkpoint: dict) -> None:
        entry = checkpoint["unified_backup"]
        if change == "no-rng":  # as a backup of the version before random-number states were saved
            checkpoint["unified_backup"] = {"should_stop": entry["should_stop"]}
        else:  # as written by a run of two processes
            entry["ranks"] = entry["ranks"] * 2

    rewrite_backup(tmp_path / "b", edit)
    model = new_model(seed=1, **model_kwargs)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        result = fit(model, tmp_path / "b", epochs=3)
    assert result.error is None and model.seen == [(2, b) for b in range(8)]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_impl")]
    assert len(messages) == 1 and "is not exact" in messages[0], messages
    expected = (
        "holds no random-number states" if change == "no-rng" else "states of 2 process(es), this run has 1"
    )
    assert expected in messages[0]
