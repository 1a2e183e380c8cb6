"""The Lightning side of the conformance driver (see ``driver.py`` for the contract of each method)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_impl import BackupAndRestore
from tests.conformance.driver import STEPS_PER_EPOCH, FitResult, Hook, Interrupt
from tests.harness import worker_argv

SAMPLES = 64
BATCH = SAMPLES // STEPS_PER_EPOCH


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed regression data of the standard run (the same for every seed)."""
    rs = np.random.RandomState(1234)
    x = rs.normal(size=(SAMPLES, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def seed_all(seed: int) -> None:
    """Seed every generator a run draws from (torch, NumPy, ``random``), as a training script would."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Run(L.LightningModule):
    """The standard MLP; ``seen`` records (epoch, batch_idx) of every training step, across fits.

    ``accumulate`` is read by ``LightningDriver.fit`` (it is a Trainer argument); ``optimizer``
    holds the optimizer of the last ``fit``, for ``optimizer_state``.
    """

    def __init__(
        self,
        seed: int = 0,
        width: int = 8,
        optimizer: str = "adam",
        shuffle: bool = False,
        dropout: float = 0.0,
        lr_schedule: bool = False,
        accumulate: int = 1,
    ) -> None:
        super().__init__()
        seed_all(seed)
        layers: list[torch.nn.Module] = [torch.nn.Linear(4, width), torch.nn.ReLU()]
        if dropout:
            layers.append(torch.nn.Dropout(dropout))
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
        self.optimizer_name = optimizer
        self.shuffle, self.lr_schedule, self.accumulate = shuffle, lr_schedule, accumulate
        self.seen: list[tuple[int, int]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.plateau = False  # set by LightningDriver.fit(patience=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.seen.append((self.current_epoch, batch_idx))
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        elif self.optimizer_name == "sgd":
            self.optimizer = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer_name!r}")
        if self.plateau:  # as Keras's ReduceLROnPlateau(patience=2, min_delta=1e9): torch counts from 0
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=0.5, patience=1, threshold=1e9, threshold_mode="abs"
            )
            return {
                "optimizer": self.optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss", "interval": "epoch"},
            }
        if not self.lr_schedule:
            return self.optimizer
        decay = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=0.9**0.25)
        return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*data()), batch_size=BATCH, shuffle=self.shuffle
        )


class _Recorder(L.Callback):
    """Records the epochs that begin and their epoch-end losses, and with ``hooks`` every training hook
    call (see ``Driver.fit``); raises ``RuntimeError("interrupt")``."""

    def __init__(self, interrupt: Interrupt, hooks: list[Hook] | None = None) -> None:
        self.interrupt = interrupt
        self.epochs_run: list[int] = []
        self.losses: dict[int, float] = {}
        self.hooks = hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record("train_begin")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_run.append(trainer.current_epoch)
        self._record("epoch_begin", trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses[trainer.current_epoch] = float(trainer.callback_metrics["train_loss"])
        self._record("epoch_end", trainer.current_epoch, self.losses[trainer.current_epoch])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._record("batch_begin", trainer.current_epoch, batch_idx, trainer.global_step)
        if self.interrupt == (trainer.current_epoch, batch_idx):
            raise RuntimeError("interrupt")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.hooks is not None:
            loss = float(outputs["loss"])
            self._record("batch_end", trainer.current_epoch, batch_idx, trainer.global_step, loss)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record("train_end")

    def _record(self, *call: Any) -> None:
        if self.hooks is not None:
            self.hooks.append(call)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interrupt == "end":
            raise RuntimeError("interrupt")


def new_trainer(epochs: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A Trainer as a restarted job would build it: CPU, quiet, no logger or checkpointing of its own
    (unless ``enable_checkpointing=True`` and a ``ModelCheckpoint`` is in ``callbacks``)."""
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


class LightningDriver:
    name = "lightning"
    message_logger: str | None = "lightning.pytorch"  # where rank-zero info goes, shown by Lightning
    begins_a_resumed_epoch = False

    def new_run(
        self,
        *,
        seed: int = 0,
        width: int = 8,
        optimizer: str = "adam",
        shuffle: bool = False,
        dropout: float = 0.0,
        lr_schedule: bool = False,
        accumulate: int = 1,
    ) -> Run:
        return Run(seed, width, optimizer, shuffle, dropout, lr_schedule, accumulate)

    def fit(
        self,
        run: Run,
        backup_dir: Path | None,
        *,
        epochs: int,
        save_freq: str | int = "epoch",
        interrupt: Interrupt = None,
        early_stopping: bool = False,
        patience: bool = False,
        backup_first: bool = False,
        record_hooks: bool = False,
        best_checkpoint: Path | None = None,
        **options: Any,
    ) -> FitResult:
        hooks: list[Hook] = []
        recorder = _Recorder(interrupt, hooks if record_hooks else None)
        callbacks: list[L.Callback] = [recorder]  # before ours: its on_fit_end runs first
        if early_stopping:
            # The first epoch always improves on +inf; the second cannot improve by 1e9, and patience=0 stops.
            callbacks.append(EarlyStopping(monitor="train_loss", min_delta=1e9, patience=0))
        run.plateau = patience
        if patience:  # no epoch after the first improves by 1e9: the LR halves after epoch 2, stop after 3
            callbacks.append(EarlyStopping(monitor="train_loss", min_delta=1e9, patience=3))
        checkpoint = None
        if best_checkpoint is not None:
            checkpoint = ModelCheckpoint(
                dirpath=best_checkpoint, filename="best", monitor="train_loss", mode="max", save_top_k=1,
                save_weights_only=True, enable_version_counter=False,
            )  # fmt: skip
            callbacks.append(checkpoint)
        if backup_dir is not None:
            backup = BackupAndRestore(backup_dir, save_freq=save_freq, **options)
            callbacks.insert(0, backup) if backup_first else callbacks.append(backup)
        trainer = new_trainer(
            epochs,
            callbacks,
            accumulate_grad_batches=run.accumulate,
            enable_checkpointing=checkpoint is not None,
        )
        error: BaseException | None = None
        try:
            trainer.fit(run)
        except Exception as exc:  # Lightning re-raises the original exception after its on_exception hooks
            error = exc
        return FitResult(
            epochs_run=recorder.epochs_run,
            global_step=trainer.global_step,
            error=error,
            losses=recorder.losses,
            hooks=hooks,
            best_score=None if checkpoint is None else float(checkpoint.best_model_score),
        )

    def checkpoint_weights(self, folder: Path) -> list[np.ndarray]:
        (path,) = folder.glob("*.ckpt")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return [tensor.numpy().copy() for name, tensor in state.items() if name.startswith("net.")]

    def learning_rate(self, run: Run) -> float:
        assert run.optimizer is not None, "fit has not run"
        return float(run.optimizer.param_groups[0]["lr"])

    def weights(self, run: Run) -> list[np.ndarray]:
        return [t.detach().cpu().numpy().copy() for t in run.net.state_dict().values()]

    def optimizer_state(self, run: Run) -> list[np.ndarray]:
        """Per parameter, in ``param_groups`` order, its state entries by name (Adam: ``exp_avg``,
        ``exp_avg_sq``, ``step``; SGD: ``momentum_buffer``); then each group's learning rate."""
        assert run.optimizer is not None, "fit has not run"
        out: list[np.ndarray] = []
        for group in run.optimizer.param_groups:
            for param in group["params"]:
                state = run.optimizer.state.get(param, {})
                out.extend(torch.as_tensor(state[key]).detach().cpu().numpy().copy() for key in sorted(state))
        out.extend(np.asarray(group["lr"], dtype=np.float64) for group in run.optimizer.param_groups)
        return out

    def demo_command(
        self,
        backup_dir: Path,
        out: Path,
        *,
        epochs: int,
        batch_sleep: float,
        save_freq: str | int = "epoch",
        exact: bool = False,
        preemption: Sequence[str] = (),
        async_backup: bool = False,
    ) -> list[str]:
        return worker_argv(
            self.name, backup_dir, out, epochs=epochs, batch_sleep=batch_sleep, save_freq=save_freq,
            exact=exact, preemption=preemption, async_backup=async_backup,
        )  # fmt: skip
