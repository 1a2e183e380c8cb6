"""BackupAndRestore on a real Lightning Trainer: resume exactness, schedulers, callbacks, safety, counters."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Any

import lightning
import lightning.pytorch as L
import pytest
import pytorch_lightning
import torch
from lightning.pytorch.callbacks import EarlyStopping

from lightning_impl import BackupAndRestore
from tests.conformance.lightning_driver import LightningDriver
from tests.lightning.helpers import NAMESPACES, assert_same_weights, fit, new_model, weights
from unified_backup import IncompatibleBackupError, InvalidArgumentError, Slot, UnsafeBackupError
from unified_backup.manifest import FileEntry

pytestmark = pytest.mark.lightning


class Probe(L.Callback):
    """Placed after BackupAndRestore: what the training looks like once the restore is done."""

    def __init__(self, backup: Any = None, early_stopping: Any = None) -> None:
        self.backup, self.early_stopping = backup, early_stopping
        self.at_start: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start = {
            "restored": self.backup.restored if self.backup else None,
            "global_step": trainer.global_step,
            "wait_count": self.early_stopping.wait_count if self.early_stopping else None,
        }


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_interrupted_then_resumed_matches_uninterrupted_in_both_namespaces(namespace, tmp_path):
    reference = new_model(namespace)
    assert fit(reference, None, epochs=3, namespace=namespace).error is None
    backup_dir = tmp_path / "backup"
    first = fit(new_model(namespace), backup_dir, epochs=3, namespace=namespace, interrupt=(1, 3))
    assert isinstance(first.error, RuntimeError) and str(first.error) == "interrupt"
    manifest = Slot(backup_dir).read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 0, 8)
    assert manifest.framework == "lightning"
    package = lightning if namespace == "lightning.pytorch" else pytorch_lightning
    assert manifest.framework_version == package.__version__

    model = new_model(namespace, seed=1)
    second = fit(model, backup_dir, epochs=3, namespace=namespace)
    assert second.error is None
    assert model.seen == [(e, b) for e in (1, 2) for b in range(8)]  # epoch 1 redone from its first batch
    assert second.trainer.global_step == 24
    assert_same_weights(weights(model), weights(reference))
    assert not backup_dir.exists()
    assert second.backup.restored.epoch == 1  # what the last fit resumed from, kept for the user


@pytest.mark.parametrize("scheduler", ["step", "plateau", "onecycle"])
def test_lr_scheduler_and_optimizer_step_continue_after_resume(scheduler, tmp_path):
    def summary(result, model):
        optimizer = result.trainer.optimizers[0]
        steps = {int(s["step"]) for s in optimizer.state.values()}
        sched = result.trainer.lr_scheduler_configs[0].scheduler.state_dict()
        return weights(model), optimizer.param_groups[0]["lr"], steps, sched

    reference = new_model(scheduler=scheduler)
    expected = summary(fit(reference, None, epochs=4), reference)
    assert fit(new_model(scheduler=scheduler), tmp_path / "b", epochs=4, interrupt=(2, 3)).error is not None
    model = new_model(seed=1, scheduler=scheduler)
    result = fit(model, tmp_path / "b", epochs=4)
    assert result.error is None
    actual = summary(result, model)
    assert_same_weights(actual[0], expected[0])
    assert actual[1] == expected[1] and actual[2] == expected[2] == {32}
    assert {k: v for k, v in actual[3].items() if k != "_get_lr_called_within_step"} == {
        k: v for k, v in expected[3].items() if k != "_get_lr_called_within_step"
    }


def test_early_stopped_run_resumed_stops_at_the_same_epoch(tmp_path):
    def early_stopping():
        return EarlyStopping(monitor="train_loss", min_delta=1e9, patience=0)  # stops after epoch 1

    reference = new_model()
    assert fit(reference, None, epochs=10, callbacks=[early_stopping()]).trainer.current_epoch == 2
    first = fit(new_model(), tmp_path / "b", epochs=10, callbacks=[early_stopping()], interrupt=(1, 3))
    assert first.error is not None
    model = new_model(seed=1)
    result = fit(model, tmp_path / "b", epochs=10, callbacks=[early_stopping()])
    # EarlyStopping's check of epoch 0 is in the backup, so epoch 1 is the last one, as uninterrupted.
    assert result.error is None and model.seen == [(1, b) for b in range(8)]
    assert_same_weights(weights(model), weights(reference))
    assert not (tmp_path / "b").exists()


def test_early_stopping_wait_count_is_restored(tmp_path):
    def early_stopping():
        return EarlyStopping(
            monitor="train_loss", min_delta=1e9, patience=3
        )  # wait 1, 2, 3 -> stop after epoch 3

    first = fit(new_model(), tmp_path / "b", epochs=10, callbacks=[early_stopping()], interrupt=(3, 2))
    assert first.error is not None
    es = early_stopping()
    backup = BackupAndRestore(tmp_path / "b")
    probe = Probe(backup, es)
    model = new_model(seed=1)
    result = fit(model, None, epochs=10, backup=backup, callbacks=[es, probe])
    assert result.error is None
    assert probe.at_start["wait_count"] == 2 and probe.at_start["global_step"] == 24
    assert probe.at_start["restored"].epoch == 3
    assert model.seen == [(3, b) for b in range(8)] and es.wait_count == 3


def test_early_stopped_run_that_crashes_before_the_delete_resumes_as_stopped(tmp_path):
    driver = LightningDriver()
    first = driver.fit(driver.new_run(), tmp_path / "b", epochs=10, interrupt="end", early_stopping=True)
    assert isinstance(first.error, RuntimeError) and first.epochs_run == [0, 1]
    assert Slot(tmp_path / "b").read_manifest().epoch == 2
    again = driver.fit(driver.new_run(seed=1), tmp_path / "b", epochs=10, early_stopping=True)
    assert again.error is None and again.epochs_run == [] and again.global_step == 16
    assert not (tmp_path / "b").exists()


class Evil:
    """Unpickling this creates a file: proof that code stored in a backup ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_backup_that_needs_unpickling_code_is_refused(tmp_path):
    backup_dir = tmp_path / "b"
    assert fit(new_model(), backup_dir, epochs=3, interrupt=(1, 0)).error is not None
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    path = slot.payload_dir(manifest) / "state.ckpt"
    marker = tmp_path / "pwned"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = {"evil": Evil(marker)}
    torch.save(checkpoint, path)
    torch.load(path, weights_only=False)  # the planted pickle is real: loading it unsafely runs it
    assert marker.exists()
    marker.unlink()
    data = path.read_bytes()
    entry = FileEntry(len(data), hashlib.sha256(data).hexdigest())  # only pickle safety may stop it now
    slot.manifest_path.write_text(dataclasses.replace(manifest, files={"state.ckpt": entry}).to_json())

    model = new_model(seed=1)
    before = weights(model)
    result = fit(model, backup_dir, epochs=3)
    assert isinstance(result.error, UnsafeBackupError), repr(result.error)
    assert "state.ckpt" in str(result.error) and "weights_only=True" in str(result.error)
    assert "getattr" in str(result.error)  # names what was refused
    assert not marker.exists()
    assert_same_weights(weights(model), before)
    assert slot.read_manifest() is not None  # refused, not deleted


def test_second_fit_with_the_same_callback_and_model_starts_fresh(tmp_path):
    backup = BackupAndRestore(tmp_path / "b")
    model, control = new_model(), new_model()
    for _ in range(2):
        probe = Probe(backup)
        result = fit(model, None, epochs=2, backup=backup, callbacks=[probe])
        assert result.error is None and fit(control, None, epochs=2).error is None
        assert probe.at_start == {"restored": None, "global_step": 0, "wait_count": None}
        assert backup.stats.backups == 2 and not (tmp_path / "b").exists()
    assert model.seen == control.seen == [(e, b) for _ in range(2) for e in range(2) for b in range(8)]
    assert_same_weights(weights(model), weights(control))


def test_resumed_fit_leaves_no_state_on_the_trainer(tmp_path):
    assert fit(new_model(), tmp_path / "b", epochs=2, interrupt=(1, 1)).error is not None
    result = fit(new_model(seed=1), tmp_path / "b", epochs=2)
    assert result.error is None
    assert result.trainer.ckpt_path is None  # Lightning had set it to the backup's file
    assert result.trainer.should_stop is False


def test_step_backups_record_their_counters_and_resume_at_the_next_batch(tmp_path, caplog):
    reference = new_model()
    assert fit(reference, None, epochs=3).error is None
    first = fit(new_model(), tmp_path / "b", epochs=3, save_freq=3, interrupt=(1, 5))
    assert first.error is not None and first.backup.stats.backups == 4  # global steps 3, 6, 9, 12
    manifest = Slot(tmp_path / "b").read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 4, 12)

    model = new_model(seed=1)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        result = fit(model, tmp_path / "b", epochs=3, save_freq=3)
    assert result.error is None
    assert not [r for r in caplog.records if r.name.startswith("lightning_impl")]  # the data is positioned
    assert model.seen[0] == (1, 4)  # the batch after the backup: none repeated, none skipped
    assert model.seen == [(1, b) for b in range(4, 8)] + [(2, b) for b in range(8)]
    assert result.trainer.global_step == 24
    assert_same_weights(weights(model), weights(reference))


def test_step_backup_due_on_an_epochs_last_batch_is_taken_when_the_epoch_closes(tmp_path, caplog):
    reference = new_model()
    assert fit(reference, None, epochs=3).error is None
    first = fit(new_model(), tmp_path / "b", epochs=3, save_freq=4, interrupt=(1, 2))
    assert first.error is not None and first.backup.stats.backups == 2  # global steps 4 and 8
    manifest = Slot(tmp_path / "b").read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 0, 8)
    model = new_model(seed=1)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        assert fit(model, tmp_path / "b", epochs=3, save_freq=4).error is None
    assert not [r for r in caplog.records if r.name.startswith("lightning_impl")]
    assert model.seen[0] == (1, 0)
    assert_same_weights(weights(model), weights(reference))


def test_step_based_training_resumes_an_epoch_end_backup_at_the_next_epoch(tmp_path):
    # max_steps set (max_epochs=-1): Lightning treats every resume as a restart; the backup of a closed
    # epoch must neither run that epoch's end hooks again (EarlyStopping would count it twice) nor a batch
    def early_stopping():
        return EarlyStopping(monitor="train_loss", min_delta=1e9, patience=100)  # counts, never stops

    limits = {"max_steps": 44}  # 5.5 epochs
    stopper = early_stopping()
    reference = new_model(scheduler="step")
    assert fit(reference, None, epochs=-1, callbacks=[stopper], **limits).error is None
    first = fit(
        new_model(scheduler="step"),
        tmp_path / "b",
        epochs=-1,
        callbacks=[early_stopping()],
        interrupt=(2, 3),
        **limits,
    )
    assert first.error is not None
    assert Slot(tmp_path / "b").read_manifest().epoch == 2
    resumed_stopper = early_stopping()
    model = new_model(seed=1, scheduler="step")
    result = fit(model, tmp_path / "b", epochs=-1, callbacks=[resumed_stopper], **limits)
    assert result.error is None
    assert model.seen == [(e, b) for e in range(2, 5) for b in range(8)] + [(5, b) for b in range(4)]
    assert result.trainer.global_step == 44 and resumed_stopper.wait_count == stopper.wait_count == 5
    assert_same_weights(weights(model), weights(reference))
    assert not (tmp_path / "b").exists()


def test_fingerprint_names_model_optimizer_and_scheduler(tmp_path):
    assert fit(new_model(scheduler="step"), tmp_path / "b", epochs=2, interrupt=(1, 0)).error is not None
    fingerprint = Slot(tmp_path / "b").read_manifest().fingerprint
    assert fingerprint == {
        "model/net.0.weight": "float32[8, 4]",
        "model/net.0.bias": "float32[8]",
        "model/net.2.weight": "float32[1, 8]",
        "model/net.2.bias": "float32[1]",
        "optimizer/0/class": "Adam",
        "optimizer/0/group/0/param/0": "float32[8, 4]",
        "optimizer/0/group/0/param/1": "float32[8]",
        "optimizer/0/group/0/param/2": "float32[1, 8]",
        "optimizer/0/group/0/param/3": "float32[1]",
        "lr_scheduler/0/class": "StepLR",
    }
    result = fit(new_model(scheduler="onecycle"), tmp_path / "b", epochs=2)
    assert isinstance(result.error, IncompatibleBackupError)
    assert "lr_scheduler/0/class: backup has StepLR, training has OneCycleLR" in str(result.error)


def test_backup_supersedes_a_ckpt_path_passed_to_fit(tmp_path, caplog):
    stale = fit(new_model(), None, epochs=1)
    stale.trainer.save_checkpoint(tmp_path / "stale.ckpt", weights_only=False)
    assert fit(new_model(), tmp_path / "b", epochs=3, interrupt=(2, 0)).error is not None
    model = new_model(seed=1)
    backup = BackupAndRestore(tmp_path / "b")
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[backup],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        trainer.fit(model, ckpt_path=tmp_path / "stale.ckpt")
    assert model.seen == [(2, b) for b in range(8)]  # from the backup (epoch 2), not the stale file (epoch 1)
    assert "not from fit(ckpt_path=" in caplog.text
    assert trainer.ckpt_path == tmp_path / "stale.ckpt"  # as Lightning leaves it after fit(ckpt_path=...)


def test_step_backups_count_from_the_step_a_ckpt_path_passed_to_fit_resumes_at(tmp_path):
    first = fit(new_model(), None, epochs=1)
    first.trainer.save_checkpoint(tmp_path / "user.ckpt", weights_only=False)  # at global step 8
    backup = BackupAndRestore(tmp_path / "b", save_freq=5, delete_checkpoint=False)
    result = fit(new_model(), None, epochs=2, backup=backup, ckpt_path=tmp_path / "user.ckpt")
    assert result.error is None and result.trainer.global_step == 16 and backup.stats.backups == 1
    assert Slot(tmp_path / "b").read_manifest().global_step == 13  # 8 + 5, not 5 or 10


def test_delete_checkpoint_false_keeps_the_final_backup_and_resumes_to_the_end(tmp_path):
    model = new_model()
    backup = BackupAndRestore(tmp_path / "b", delete_checkpoint=False)
    assert fit(model, None, epochs=2, backup=backup).error is None
    manifest = Slot(tmp_path / "b").read_manifest()
    assert (manifest.epoch, manifest.global_step) == (2, 16)
    again = new_model(seed=1)
    assert fit(again, tmp_path / "b", epochs=2).error is None  # delete_checkpoint=True this time
    assert again.seen == [] and not (tmp_path / "b").exists()
    assert_same_weights(weights(again), weights(model))


def test_a_backup_that_could_never_be_restored_safely_fails_at_the_first_backup(tmp_path):
    model = new_model()
    model.save_hyperparameters({"data_dir": pathlib.Path("data")})  # a Path needs unpickling code
    result = fit(model, tmp_path / "b", epochs=3)
    assert isinstance(result.error, UnsafeBackupError), repr(result.error)
    assert "PosixPath" in str(result.error) and "save_hyperparameters()" in str(result.error)
    assert model.seen == [(0, b) for b in range(8)]  # the first backup, after epoch 0, refused it
    assert Slot(tmp_path / "b").read_manifest() is None  # nothing unrestorable was committed


def test_public_api_is_the_same_in_both_namespaces(tmp_path):
    import lightning_impl
    import lightning_impl.pl
    from lightning_impl.callback import BackupAndRestoreMixin
    from unified_backup import InvalidArgumentError

    assert lightning_impl.__all__ == lightning_impl.pl.__all__ == ["BackupAndRestore"]
    for ns, cls in NAMESPACES.values():
        callback = cls(tmp_path, save_freq=5, delete_checkpoint=False)
        assert isinstance(callback, ns.Callback) and isinstance(callback, BackupAndRestoreMixin)
        assert (callback.backup_dir, callback.save_freq, callback.delete_checkpoint) == (tmp_path, 5, False)
        assert callback.save_before_preemption is False and callback.restored is None
        assert callback.stats.backups == 0
        with pytest.raises(InvalidArgumentError, match="save_freq"):
            cls(tmp_path, save_freq=0)
        assert cls(tmp_path, save_before_preemption=True).save_before_preemption is True
        listed = cls(tmp_path, save_before_preemption=["SIGTERM", "SIGUSR1"]).save_before_preemption
        assert listed == ("SIGTERM", "SIGUSR1")
        with pytest.raises(InvalidArgumentError, match="save_before_preemption"):
            cls(tmp_path, save_before_preemption=["SIGNOPE"])


def test_strategies_that_restore_after_setup_are_refused(tmp_path):
    class Sharded(L.strategies.SingleDeviceStrategy):  # stands for FSDP / DeepSpeed, which need GPUs
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    from unified_backup import UnsupportedEnvironmentError

    result = fit(new_model(), tmp_path / "b", epochs=1, strategy=Sharded(device=torch.device("cpu")))
    assert isinstance(result.error, UnsupportedEnvironmentError), repr(result.error)
    assert "Sharded strategy" in str(result.error)
    assert not (tmp_path / "b").exists()


def test_a_backup_writes_no_temporary_file_outside_backup_dir(tmp_path, monkeypatch):
    """Lightning's own save writes a temporary file in $TMPDIR and moves it: a kill inside that write
    left a state-sized file there for good. A backup writes its checkpoint into the staging folder."""
    import tempfile

    made: list[str] = []
    mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args: Any, **kwargs: Any) -> Any:
        fd, name = mkstemp(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    backup = BackupAndRestore(tmp_path / "b", delete_checkpoint=False)
    result = fit(new_model("lightning.pytorch"), None, epochs=2, backup=backup)
    assert result.error is None and Slot(tmp_path / "b").read_manifest().epoch == 2
    assert made == []
    result.trainer.save_checkpoint(tmp_path / "lightning.ckpt")  # Lightning's own save makes one
    assert len(made) == 1 and not pathlib.Path(made[0]).is_relative_to(tmp_path)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_callback_of_the_other_namespace_is_refused_by_name_before_any_write(namespace, tmp_path):
    other = next(n for n in NAMESPACES if n != namespace)
    wrong = NAMESPACES[other][1](tmp_path / "backup")  # e.g. lightning_impl's in a pytorch_lightning Trainer
    result = fit(new_model(namespace), None, epochs=1, namespace=namespace, backup=wrong)
    assert isinstance(result.error, InvalidArgumentError), result.error
    right = "lightning_impl.pl" if namespace == "pytorch_lightning" else "lightning_impl"
    assert f"Expected a {other} Trainer for this BackupAndRestore" in str(result.error)
    assert f"Use `from {right} import BackupAndRestore` with it." in str(result.error)
    assert result.trainer.global_step == 0 and not (tmp_path / "backup").exists()
