"""The Lightning demo worker: ``python -m lightning_impl.demo --backup-dir DIR --out OUT.json``.

``[--epochs 10] [--seed 0] [--batch-sleep 0.0] [--save-freq epoch|N] [--shuffle] [--dropout RATE]
[--hidden 16] [--save-before-preemption [SIGNAL ...]] [--keep-previous]``

Trains the demo MLP with ``BackupAndRestore`` and prints ``UB-EVENT {json}`` lines on stdout
(start, one per closed epoch with its mean loss, done); writes the final weights, their sha256 and
the losses of the epochs it trained to ``--out`` on success. Used by ``unified-backup demo``, the
conformance scenarios and the fault campaign.
``--shuffle`` reshuffles the samples every epoch (``DataLoader(shuffle=True)``, drawing from torch's
global generator); ``--dropout RATE`` adds a Dropout layer after the hidden one: a killed and
resumed run still ends bit-identical to an uninterrupted one, with ``--save-freq N`` too.
``--hidden N`` sets the hidden width (the size of the state). ``--save-before-preemption`` alone
stops on SIGTERM, with signal names (``SIGTERM SIGUSR1``) on those: the run backs up its step and
exits with code 143. ``--keep-previous`` passes ``keep_previous=True`` (the second slot).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from lightning_impl import BackupAndRestore
from unified_backup.demo import callback_options, emit, worker_parser


class DemoModel(L.LightningModule):
    """MLP 4 -> hidden (ReLU) [-> Dropout] -> 1, Adam lr 1e-2, MSE, on 256 fixed samples in batches of 16."""

    def __init__(self, seed: int, shuffle: bool = False, dropout: float = 0.0, hidden: int = 16) -> None:
        super().__init__()
        self.seed, self.shuffle = seed, shuffle
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        layers: list[torch.nn.Module] = [torch.nn.Linear(4, hidden), torch.nn.ReLU()]
        if dropout:
            layers.append(torch.nn.Dropout(dropout))
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)  # the epoch's mean, for the demo's curves
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rs = np.random.RandomState(self.seed)
        x = rs.normal(size=(256, 4)).astype(np.float32)
        y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=self.shuffle)


class Events(L.Callback):
    """Prints the event lines; placed after BackupAndRestore, so each epoch's backup is committed first."""

    def __init__(self, backup: BackupAndRestore, batch_sleep: float) -> None:
        self.backup = backup
        self.batch_sleep = batch_sleep
        self.epochs_run = 0
        self.closed = False
        self.losses: dict[int, float] = {}  # epoch -> its mean training loss, for epochs trained here

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored = self.backup.restored
        emit("start", restored_epoch=restored.epoch if restored else None, global_step=trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_closed(trainer)
        self.epochs_run += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.batch_sleep:
            time.sleep(self.batch_sleep)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.closed = True
        self.losses[trainer.current_epoch] = float(trainer.callback_metrics["train_loss"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_closed(trainer)

    def _epoch_closed(self, trainer: L.Trainer) -> None:
        # BackupAndRestore backs up an epoch once it is closed: at the next epoch's start or at the end.
        if self.closed:
            self.closed = False
            epoch = trainer.current_epoch - 1
            emit("epoch", epoch=epoch, loss=self.losses[epoch])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return worker_parser("lightning_impl.demo", __doc__.splitlines()[0]).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    backup = BackupAndRestore(args.backup_dir, **callback_options(args))
    events = Events(backup, args.batch_sleep)
    model = DemoModel(args.seed, shuffle=args.shuffle, dropout=args.dropout, hidden=args.hidden)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[backup, events],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model)  # a preemption ends the process here, with exit code 143
    emit(
        "done",
        backups=backup.stats.backups,
        backup_seconds=backup.stats.seconds,
        epochs_run=events.epochs_run,
    )
    weights = np.concatenate(
        [t.detach().cpu().double().numpy().ravel() for t in model.net.state_dict().values()]
    )
    digest = hashlib.sha256(weights.astype("<f8").tobytes()).hexdigest()
    out = {
        "framework": "lightning",
        "weights": weights.tolist(),
        "weights_sha256": digest,
        "losses": {str(epoch): loss for epoch, loss in events.losses.items()},
    }
    args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
