"""The Lightning side of the conformance driver (see ``driver.py`` for the contract of each method)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping

from lightning_impl import BackupAndRestore
from tests.conformance.driver import STEPS_PER_EPOCH, FitResult, Interrupt

SAMPLES = 64
BATCH = SAMPLES // STEPS_PER_EPOCH


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed regression data of the standard run (the same for every seed)."""
    rs = np.random.RandomState(1234)
    x = rs.normal(size=(SAMPLES, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


class Run(L.LightningModule):
    """The standard MLP; ``seen`` records (epoch, batch_idx) of every training step, across fits."""

    def __init__(self, seed: int = 0, width: int = 8, optimizer: str = "adam") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
        self.optimizer_name = optimizer
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.seen.append((self.current_epoch, batch_idx))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}")

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*data()), batch_size=BATCH, shuffle=False
        )


class _Recorder(L.Callback):
    """Records the epochs that begin, and raises ``RuntimeError("interrupt")`` where asked."""

    def __init__(self, interrupt: Interrupt) -> None:
        self.interrupt = interrupt
        self.epochs_run: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_run.append(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interrupt == (trainer.current_epoch, batch_idx):
            raise RuntimeError("interrupt")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interrupt == "end":
            raise RuntimeError("interrupt")


def new_trainer(epochs: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A Trainer as a restarted job would build it: CPU, quiet, no logger or checkpointing of its own."""
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


class LightningDriver:
    name = "lightning"

    def new_run(self, *, seed: int = 0, width: int = 8, optimizer: str = "adam") -> Run:
        return Run(seed=seed, width=width, optimizer=optimizer)

    def fit(
        self,
        run: Run,
        backup_dir: Path | None,
        *,
        epochs: int,
        save_freq: str | int = "epoch",
        interrupt: Interrupt = None,
        early_stopping: bool = False,
    ) -> FitResult:
        recorder = _Recorder(interrupt)
        callbacks: list[L.Callback] = [recorder]  # before ours: its on_fit_end runs first
        if early_stopping:
            # The first epoch always improves on +inf; the second cannot improve by 1e9, and patience=0 stops.
            callbacks.append(EarlyStopping(monitor="train_loss", min_delta=1e9, patience=0))
        if backup_dir is not None:
            callbacks.append(BackupAndRestore(backup_dir, save_freq=save_freq))
        trainer = new_trainer(epochs, callbacks)
        error: BaseException | None = None
        try:
            trainer.fit(run)
        except Exception as exc:  # Lightning re-raises the original exception after its on_exception hooks
            error = exc
        return FitResult(epochs_run=recorder.epochs_run, global_step=trainer.global_step, error=error)

    def weights(self, run: Run) -> list[np.ndarray]:
        return [t.detach().cpu().numpy().copy() for t in run.net.state_dict().values()]

    def demo_command(self, backup_dir: Path, out: Path, *, epochs: int, batch_sleep: float) -> list[str]:
        return [
            sys.executable,
            "-m",
            "lightning_impl.demo",
            "--backup-dir",
            str(backup_dir),
            "--out",
            str(out),
            "--epochs",
            str(epochs),
            "--batch-sleep",
            str(batch_sleep),
        ]
