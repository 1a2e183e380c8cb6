"""Guards on the Lightning internals that ``lightning_impl/_private.py`` relies on.

When one of these fails after a Lightning upgrade, read its message, then update ``_private.py``.
"""

from __future__ import annotations

import importlib
import inspect
import signal
import subprocess
from typing import Any

import pytest
import torch

from lightning_impl import _private
from lightning_impl.state import check_strategy
from tests.lightning.helpers import NAMESPACES, fit, new_model, weights
from unified_backup import BackupError, UnsupportedEnvironmentError

pytestmark = pytest.mark.lightning

CHANGED = "Lightning changed an internal that lightning_impl/_private.py uses: "


def trainer_of(namespace: str, **kwargs: Any) -> Any:
    return NAMESPACES[namespace][0].Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_private_entry_points_still_exist(namespace):
    trainer = trainer_of(namespace)
    assert _private.has_restore_modules_and_callbacks(trainer), (
        CHANGED
        + "Trainer._checkpoint_connector._restore_modules_and_callbacks(path, weights_only=...) is gone "
        "or lost its weights_only parameter."
    )
    connector = trainer._checkpoint_connector
    assert hasattr(connector, "_ckpt_path") and hasattr(connector, "_user_managed"), (
        CHANGED + "_CheckpointConnector no longer keeps _ckpt_path / _user_managed."
    )
    _private.set_ckpt_path(trainer, "somewhere.ckpt")
    assert trainer.ckpt_path == "somewhere.ckpt", CHANGED + "Trainer.ckpt_path no longer reads _ckpt_path."
    assert connector._user_managed is False


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_restore_in_on_fit_start_restores_model_callbacks_optimizer_scheduler_and_loops(namespace, tmp_path):
    ns = NAMESPACES[namespace][0]
    trained = new_model(namespace, scheduler="step")
    stopper = ns.callbacks.EarlyStopping(monitor="train_loss", min_delta=1e9, patience=5)
    first = fit(trained, None, epochs=2, namespace=namespace, callbacks=[stopper])
    assert first.error is None and stopper.wait_count == 1
    path = tmp_path / "state.ckpt"
    first.trainer.save_checkpoint(path, weights_only=False)

    seen: dict[str, Any] = {}

    class Restore(ns.Callback):
        def on_fit_start(self, trainer, pl_module):
            _private.restore_modules_and_callbacks(trainer, path)
            seen["weights"] = weights(pl_module)  # restored now, before Lightning's own restore

        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            seen["step"] = {int(s["step"]) for s in optimizer.state.values()}
            seen["lr"] = optimizer.param_groups[0]["lr"]
            seen["last_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
            seen["loops"] = (trainer.current_epoch, trainer.global_step)
            seen["freed"] = trainer._checkpoint_connector._loaded_checkpoint == {}

    new_stopper = ns.callbacks.EarlyStopping(monitor="train_loss", min_delta=1e9, patience=5)
    model = new_model(namespace, seed=1, scheduler="step")
    probe = fit(
        model, None, epochs=3, namespace=namespace, callbacks=[new_stopper, Restore()], limit_train_batches=1
    )
    assert probe.error is None
    for got, want in zip(seen["weights"], weights(trained), strict=True):
        assert torch.equal(torch.from_numpy(got), torch.from_numpy(want)), (
            CHANGED + "the model was not restored."
        )
    assert seen["step"] == {16}, CHANGED + "the optimizer state was not restored after on_fit_start."
    assert seen["lr"] == 0.0025 and seen["last_epoch"] == 2, CHANGED + "the LR scheduler was not restored."
    assert seen["loops"] == (2, 16), CHANGED + "the loops (epoch, global step) were not restored."
    assert seen["freed"], CHANGED + "resume_end no longer frees the loaded checkpoint."
    assert new_stopper.wait_count == 2, (
        CHANGED + "callback states were not restored (EarlyStopping.wait_count)."
    )


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_checkpoint_is_built_and_the_loaded_one_is_kept_where_the_state_reads_them(namespace, tmp_path):
    result = fit(new_model(namespace), None, epochs=1, namespace=namespace)
    checkpoint = _private.dump_checkpoint(result.trainer)
    assert {"state_dict", "optimizer_states", "loops", "callbacks"} <= checkpoint.keys(), (
        CHANGED
        + "_CheckpointConnector.dump_checkpoint(weights_only=False) no longer builds a full checkpoint."
    )
    checkpoint["unified_backup"] = {"marker": 1}
    torch.save(checkpoint, tmp_path / "state.ckpt")
    seen: dict[str, Any] = {}

    class Restore(NAMESPACES[namespace][0].Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            _private.restore_modules_and_callbacks(trainer, tmp_path / "state.ckpt")
            seen["entry"] = _private.loaded_checkpoint(trainer).get("unified_backup")

    assert fit(new_model(namespace), None, epochs=2, namespace=namespace, callbacks=[Restore()]).error is None
    assert seen["entry"] == {"marker": 1}, CHANGED + "_CheckpointConnector._loaded_checkpoint is gone."


@pytest.mark.parametrize("step_based", [False, True])
def test_counters_of_a_checkpoint_are_where_mark_epoch_closed_expects_them(tmp_path, step_based):
    result = fit(new_model(), None, epochs=2)
    result.trainer.save_checkpoint(tmp_path / "state.ckpt", weights_only=False)
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=True)
    _private.mark_epoch_closed(checkpoint, step_based=step_based)
    loops = checkpoint["loops"]["fit_loop"]
    epochs = {"ready": 3, "started": 2, "processed": 2, "completed": 2}  # at the next epoch's start
    if not step_based:
        epochs = {"ready": 2, "started": 2, "processed": 2, "completed": 1}  # at the epoch's end
    for part in ("total", "current"):
        assert loops["epoch_progress"][part] == epochs, CHANGED + str(loops["epoch_progress"])
    batches = loops["epoch_loop.batch_progress"]
    assert batches["total"] == dict.fromkeys(["ready", "started", "processed", "completed"], 16)
    assert batches["current"] == dict.fromkeys(
        ["ready", "started", "processed", "completed"], 0 if step_based else 8
    )
    assert batches["is_last_batch"] is not step_based


def test_mark_epoch_closed_refuses_an_unknown_layout():
    with pytest.raises(BackupError, match="not supported yet"):
        _private.mark_epoch_closed(
            {"loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}}}}}, step_based=False
        )
    counters = {"ready": 3, "started": 3, "processed": 3, "completed": 2}  # mid-epoch, not a closed epoch
    progress = {"total": counters, "current": counters}
    with pytest.raises(BackupError, match="started == processed == completed"):
        _private.mark_epoch_closed(
            {"loops": {"fit_loop": {"epoch_progress": progress, "epoch_loop.batch_progress": progress}}},
            step_based=True,
        )


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_lightning_sigterm_flag_that_a_preemption_watch_takes_over(namespace):
    trainer = trainer_of(namespace)
    assert trainer.received_sigterm is False
    trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
    assert trainer.received_sigterm is True, (
        CHANGED + "Trainer.received_sigterm no longer reads the connector."
    )
    assert _private.clear_received_sigterm(trainer) is True and trainer.received_sigterm is False
    assert _private.clear_received_sigterm(trainer) is False


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_training_data_internals_that_position_a_resumed_epoch(namespace):
    ns = NAMESPACES[namespace][0]
    seen: dict[str, Any] = {}

    class Probe(ns.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["loaders"] = _private.train_loaders(trainer)
            seen["length"] = _private.epoch_length(trainer)
            _private.restart_epoch_data(
                trainer
            )  # a new iterator for the epoch, then 3 batches read and dropped
            _private.skip_batches(trainer, 3)

        def on_train_epoch_start(self, trainer, pl_module):
            seen.setdefault("made_after", []).append(_private.iterator_made_after_epoch_start(trainer))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("first", (batch_idx, batch[0].clone()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 1:
                seen["aggregates"] = _private.epoch_aggregates(trainer)

    model = new_model(namespace)
    result = fit(model, None, epochs=2, namespace=namespace, callbacks=[Probe()])
    assert result.error is None
    assert seen["loaders"] == [result.trainer.train_dataloader] and seen["length"] == 8, (
        CHANGED + "fit_loop._combined_loader no longer holds the training loaders."
    )
    assert seen["made_after"] == [False, True], (
        CHANGED + "the epoch's iterator is no longer made by setup_data for the first epoch only."
    )
    first_index, first_x = seen["first"]
    assert first_index == 0 and torch.equal(
        first_x, result.trainer.train_dataloader.dataset.tensors[0][24:32]
    ), CHANGED + "skipping batches below the data fetcher no longer moves the epoch's first batch."
    assert [b for e, b in model.seen if e == 0] == list(range(5)), (
        CHANGED + "the data fetcher no longer ends the epoch once its length is reached."
    )
    aggregates = seen["aggregates"]["training_step.train_loss"]
    assert int(aggregates["cumulated_batch_size"]) == 16 and aggregates["value"].dtype == torch.float32, (
        CHANGED + "the epoch's logged values (fit_loop.epoch_loop._results) changed shape."
    )


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_not_resumable_warning_that_a_positioned_resume_silences_is_still_worded_so(namespace):
    module = importlib.import_module(f"{namespace}.loops.training_epoch_loop")
    assert _private.QuietNotResumableWarning._MESSAGE in inspect.getsource(module), (
        CHANGED + "_TrainingEpochLoop.reset no longer warns about dataloaders that are not resumable in "
        "these words; update QuietNotResumableWarning._MESSAGE."
    )


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_validation_follows_predicts_the_validations_inside_an_epoch(namespace):
    ns = NAMESPACES[namespace][0]
    predicted: list[tuple[int, int]] = []
    ran: list[tuple[int, int]] = []

    class Probe(ns.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if _private.validation_follows(trainer):
                predicted.append((trainer.current_epoch, batch_idx))

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                ran.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))

    model = new_model(namespace, validate=True)
    result = fit(model, None, epochs=2, namespace=namespace, callbacks=[Probe()], val_check_interval=0.5)
    assert result.error is None
    assert predicted == ran == [(0, 3), (0, 7), (1, 3), (1, 7)], (
        CHANGED + "_TrainingEpochLoop._should_check_val_fx no longer predicts the validation runs."
    )


@pytest.mark.parametrize("fabric", ["lightning.fabric", "lightning_fabric"])
def test_the_ddp_launchers_child_process_observer_can_be_kept_from_killing_rank_0(fabric):
    observer_class = importlib.import_module(
        f"{fabric}.strategies.launchers.subprocess_script"
    )._ChildProcessObserver
    exited = subprocess.Popen(["sh", "-c", "exit 143"])  # a rank that stopped on a preemption
    exited.wait()
    rank_0 = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]  # stand-ins for the launcher process
    try:
        spared, control = (observer_class(r.pid, [exited], sleep_period=0.3) for r in rank_0)
        spared.start()
        _private.spare_from_child_process_observer()
        control.start()
        spared.join(5)
        control.join(5)
        assert not spared.is_alive() and rank_0[0].poll() is None, (
            CHANGED
            + "emptying _ChildProcessObserver._child_processes no longer keeps it from killing rank 0."
        )
        assert rank_0[1].wait(5) == -signal.SIGKILL, CHANGED + "_ChildProcessObserver no longer kills rank 0."
    finally:
        for process in rank_0:
            process.kill()
            process.wait()


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_the_slurm_requeue_signal_is_read_where_lightnings_signal_connector_reads_it(namespace, monkeypatch):
    environments = importlib.import_module(f"{namespace}.plugins.environments")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    requeue = trainer_of(namespace, plugins=[environments.SLURMEnvironment(requeue_signal=signal.SIGUSR2)])
    assert _private.slurm_requeue_signal(requeue) == signal.SIGUSR2, CHANGED + "cluster_environment"
    off = trainer_of(namespace, plugins=[environments.SLURMEnvironment(auto_requeue=False)])
    assert _private.slurm_requeue_signal(off) is None
    monkeypatch.delenv("SLURM_NTASKS")
    assert _private.slurm_requeue_signal(trainer_of(namespace)) is None
    connector = importlib.import_module(f"{namespace}.trainer.connectors.signal_connector")
    source = inspect.getsource(connector._SignalConnector.register_signal_handlers)
    assert "_accelerator_connector.cluster_environment" in source and "auto_requeue" in source, CHANGED


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_sharded_checkpoints_are_model_parallels_with_their_pickled_part_in_meta_pt(namespace, tmp_path):
    ns = NAMESPACES[namespace][0]
    strategy = ns.strategies.ModelParallelStrategy()
    assert _private.is_model_parallel(strategy) and strategy.restore_checkpoint_after_setup, (
        CHANGED + "ModelParallelStrategy was renamed or no longer restores checkpoints after setup."
    )
    assert not _private.is_model_parallel(ns.strategies.DDPStrategy())
    full = ns.strategies.ModelParallelStrategy(save_distributed_checkpoint=False)
    assert _private.saves_full_state(full) and not _private.saves_full_state(strategy), (
        CHANGED
        + "ModelParallelStrategy no longer keeps save_distributed_checkpoint as _save_distributed_checkpoint."
    )
    with pytest.raises(UnsupportedEnvironmentError, match=r"Pass save_distributed_checkpoint=True"):
        check_strategy(full)  # its backups would be one file, gathered on rank 0
    fabric = {"lightning.pytorch": "lightning.fabric", "pytorch_lightning": "lightning_fabric"}[namespace]
    metadata = importlib.import_module(
        f"{fabric}.strategies.model_parallel"
    )._METADATA_FILENAME  # _load_checkpoint's
    assert _private.pickled_part(tmp_path) == tmp_path / metadata, (
        CHANGED + f"a sharded checkpoint keeps its torch.save part in {metadata!r}, not meta.pt."
    )
    assert _private.pickled_part(tmp_path / "state.ckpt") == tmp_path / "state.ckpt"


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_skip_restore_after_setup_skips_the_load_of_ckpt_path_that_follows_on_fit_start(namespace, tmp_path):
    ns = NAMESPACES[namespace][0]

    class AfterSetup(ns.strategies.SingleDeviceStrategy):  # as ModelParallelStrategy, on one CPU
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    class Skip(ns.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            _private.skip_restore_after_setup(trainer)

    missing = tmp_path / "missing.ckpt"
    plain = trainer_of(namespace, max_epochs=1, strategy=AfterSetup(device=torch.device("cpu")))
    with pytest.raises(FileNotFoundError):  # Lightning loads ckpt_path after on_fit_start ...
        plain.fit(new_model(namespace), ckpt_path=missing)
    skipping = trainer_of(
        namespace, max_epochs=1, strategy=AfterSetup(device=torch.device("cpu")), callbacks=[Skip()]
    )
    skipping.fit(new_model(namespace), ckpt_path=missing)  # ... in the one call that is skipped
    assert skipping.global_step > 0, CHANGED + "Trainer._run no longer restores after setup where it did."
    assert "_restore_modules_and_callbacks" not in vars(
        skipping._checkpoint_connector
    )  # the skip removed itself
