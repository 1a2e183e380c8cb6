"""A small Lightning training for the adapter tests, in either namespace, with optional LR schedulers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch
import numpy as np
import pytorch_lightning
import torch

import lightning_impl
import lightning_impl.pl
from tests.conformance.lightning_driver import BATCH, data

NAMESPACES: dict[str, tuple[ModuleType, type]] = {
    "lightning.pytorch": (lightning.pytorch, lightning_impl.BackupAndRestore),
    "pytorch_lightning": (pytorch_lightning, lightning_impl.pl.BackupAndRestore),
}
_MODELS: dict[str, type] = {}


def model_class(namespace: str = "lightning.pytorch") -> type:
    """The test model as a LightningModule of ``namespace`` (one class per namespace)."""
    if namespace not in _MODELS:
        ns = NAMESPACES[namespace][0]

        class Model(ns.LightningModule):  # type: ignore[name-defined, misc]
            def __init__(self, seed: int = 0, scheduler: str | None = None, optimizer: str = "adam") -> None:
                super().__init__()
                torch.manual_seed(seed)
                self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
                self.scheduler, self.optimizer_name = scheduler, optimizer
                self.seen: list[tuple[int, int]] = []

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
                self.log("train_loss", loss, on_step=False, on_epoch=True)
                self.seen.append((self.current_epoch, batch_idx))
                return loss

            def configure_optimizers(self) -> Any:
                opt: torch.optim.Optimizer
                if self.optimizer_name == "sgd":
                    opt = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
                else:
                    opt = torch.optim.Adam(self.parameters(), lr=1e-2)
                if self.scheduler == "step":  # epoch interval
                    return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
                if self.scheduler == "plateau":  # stepped after on_train_epoch_end
                    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                        opt, patience=0, factor=0.5, threshold=10
                    )
                    return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}
                if self.scheduler == "onecycle":  # step interval
                    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=100)
                    return {"optimizer": opt, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}
                return opt

            def train_dataloader(self) -> torch.utils.data.DataLoader:
                dataset = torch.utils.data.TensorDataset(*data())
                return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)

        _MODELS[namespace] = Model
    return _MODELS[namespace]


def new_model(namespace: str = "lightning.pytorch", **kwargs: Any) -> Any:
    return model_class(namespace)(**kwargs)


@dataclasses.dataclass
class Fit:
    trainer: Any
    backup: Any
    error: BaseException | None


def interrupter(namespace: str, at: tuple[int, int], exc: type[BaseException] = RuntimeError) -> Any:
    """A callback that raises ``exc("interrupt")`` just before batch ``at[1]`` of epoch ``at[0]``."""
    ns = NAMESPACES[namespace][0]

    class Interrupt(ns.Callback):  # type: ignore[name-defined, misc]
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if (trainer.current_epoch, batch_idx) == at:
                raise exc("interrupt")

    return Interrupt()


def fit(
    model: Any,
    backup_dir: Path | None,
    *,
    epochs: int,
    namespace: str = "lightning.pytorch",
    interrupt: tuple[int, int] | None = None,
    callbacks: list[Any] | None = None,
    backup: Any = None,
    save_freq: str | int = "epoch",
    exc: type[BaseException] = RuntimeError,
    **trainer_kwargs: Any,
) -> Fit:
    """One ``fit`` with a new Trainer, as a restarted job would run it; errors are returned, not raised."""
    ns, callback_class = NAMESPACES[namespace]
    if backup is None and backup_dir is not None:
        backup = callback_class(backup_dir, save_freq=save_freq)
    all_callbacks = list(callbacks or [])
    if interrupt is not None:
        all_callbacks.insert(0, interrupter(namespace, interrupt, exc))
    if backup is not None:
        all_callbacks.append(backup)
    trainer = ns.Trainer(
        max_epochs=epochs,
        callbacks=all_callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **trainer_kwargs,
    )
    error = None
    try:
        trainer.fit(model)
    except Exception as exc:
        error = exc
    return Fit(trainer, backup, error)


def weights(model: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.net.state_dict().values()]


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)
