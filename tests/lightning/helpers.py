"""A small Lightning training for the adapter tests, in either namespace: LR schedulers, dropout, loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch
import numpy as np
import pytorch_lightning
import torch
from torch.distributed.tensor import DTensor

import lightning_impl
import lightning_impl.pl
from tests.conformance.lightning_driver import BATCH, data, seed_all

NAMESPACES: dict[str, tuple[ModuleType, type]] = {
    "lightning.pytorch": (lightning.pytorch, lightning_impl.BackupAndRestore),
    "pytorch_lightning": (pytorch_lightning, lightning_impl.pl.BackupAndRestore),
}
_MODELS: dict[tuple[str, bool], type] = {}


class NoisyDataset(torch.utils.data.Dataset):
    """The standard data with random noise added to each sample as it is read: a random augmentation.

    The noise comes from torch's global generator of the process that reads the sample (the main
    process, or a DataLoader worker).
    """

    def __init__(self) -> None:
        self.x, self.y = data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class StreamDataset(torch.utils.data.IterableDataset):
    """The standard data as a stream, in an order drawn from torch's global generator."""

    def __iter__(self) -> Any:
        x, y = data()
        for i in torch.randperm(len(x)).tolist():
            yield x[i], y[i]


def make_loader(kind: str, shuffle: bool) -> Any:
    """A training loader of the standard data, ``BATCH`` samples a batch, of one of the kinds tested."""
    dataset = torch.utils.data.TensorDataset(*data())
    DataLoader = torch.utils.data.DataLoader
    if kind == "plain":
        return DataLoader(dataset, batch_size=BATCH, shuffle=shuffle)
    if kind == "generator":  # the permutation is drawn from this generator, not the global one
        return DataLoader(
            dataset, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(7)
        )
    if kind == "noisy":
        return DataLoader(NoisyDataset(), batch_size=BATCH, shuffle=shuffle)
    if kind == "workers":  # random augmentation inside two worker processes
        return DataLoader(NoisyDataset(), batch_size=BATCH, shuffle=shuffle, num_workers=2)
    if kind == "persistent":
        return DataLoader(dataset, batch_size=BATCH, shuffle=shuffle, num_workers=2, persistent_workers=True)
    if kind == "distributed":  # shuffles by seed and epoch (set_epoch), as under DDP
        sampler: Any = torch.utils.data.DistributedSampler(
            dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=3
        )
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=BATCH, shuffle=shuffle)
    if kind == "stream":
        return DataLoader(StreamDataset(), batch_size=BATCH)
    raise ValueError(f"unknown loader kind {kind!r}")


def model_class(namespace: str = "lightning.pytorch", validate: bool = False) -> type:
    """The test model as a LightningModule of ``namespace``; ``validate``: with a shuffled validation set."""
    if (namespace, validate) not in _MODELS:
        ns = NAMESPACES[namespace][0]

        class Model(ns.LightningModule):  # type: ignore[name-defined, misc]
            def __init__(
                self,
                seed: int = 0,
                scheduler: str | None = None,
                optimizer: str = "adam",
                dropout: float = 0.0,
                shuffle: bool = False,
                loader: str = "plain",
                sharded: bool = False,
            ) -> None:
                super().__init__()
                seed_all(seed)
                layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8), torch.nn.ReLU()]
                if dropout:
                    layers.append(torch.nn.Dropout(dropout))
                self.net = torch.nn.Sequential(*layers, torch.nn.Linear(8, 1))
                self.scheduler, self.optimizer_name = scheduler, optimizer
                self.shuffle, self.loader, self.sharded = shuffle, loader, sharded
                self.seen: list[tuple[int, int]] = []

            def configure_model(self) -> None:
                """``sharded``: FSDP2 over the data-parallel mesh (ModelParallelStrategy), per layer."""
                if self.sharded and not _is_sharded(self.net):
                    from torch.distributed.fsdp import fully_shard

                    mesh = self.device_mesh["data_parallel"]
                    for layer in self.net:
                        if isinstance(layer, torch.nn.Linear):
                            fully_shard(layer, mesh=mesh)
                    fully_shard(self.net, mesh=mesh)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
                self.log("train_loss", loss, on_step=False, on_epoch=True)  # the epoch's mean
                self.log("train_loss_max", loss, on_step=False, on_epoch=True, reduce_fx="max")
                self.log("train_loss_sum", loss, on_step=False, on_epoch=True, reduce_fx="sum")
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
                if self.scheduler == "exponential":  # step interval
                    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9**0.25)
                    return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}
                return opt

            def train_dataloader(self) -> Any:
                return make_loader(self.loader, self.shuffle)

            if validate:  # its loader draws from the global generator at every validation

                def validation_step(self, batch: Any, batch_idx: int) -> None:
                    self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

                def val_dataloader(self) -> Any:
                    return make_loader("plain", shuffle=True)

        # picklable by reference: ddp_spawn sends the model to processes that import this module anew
        Model.__qualname__, Model.__module__ = _class_name(namespace, validate), __name__
        _MODELS[namespace, validate] = Model
    return _MODELS[namespace, validate]


def _class_name(namespace: str, validate: bool) -> str:
    return f"Model_{namespace.replace('.', '_')}" + ("_validate" if validate else "")


def __getattr__(name: str) -> type:
    """The model classes by the names pickle gives them (see ``model_class``), made on first use."""
    for namespace in NAMESPACES:
        for validate in (False, True):
            if name == _class_name(namespace, validate):
                return model_class(namespace, validate)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_model(namespace: str = "lightning.pytorch", validate: bool = False, **kwargs: Any) -> Any:
    return model_class(namespace, validate)(**kwargs)


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
    ckpt_path: Path | None = None,
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
        trainer.fit(model, ckpt_path=ckpt_path)
    except Exception as exc:
        error = exc
    return Fit(trainer, backup, error)


def weights(model: Any) -> list[np.ndarray]:
    """The model's weights; of a sharded model, this process's shards (no collective)."""
    return [_local(t).detach().cpu().numpy().copy() for t in model.net.state_dict().values()]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def stand_in_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` executable in ``folder`` that records its arguments in ``folder/scontrol.log``."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "scontrol.log"}"\nexit {exit_code}\n')
    script.chmod(0o755)
    return folder / "scontrol.log"
