"""The per-framework driver that the conformance scenarios run against.

Each adapter supplies one ``Driver`` (``keras_driver.py``: Keras 3 and tf_keras; ``lightning_driver.py``);
scenarios in ``test_*.py`` are written once against this interface and assert the same outcome for all.

The standard run: a small deterministic MLP (4 inputs -> ``width`` hidden, ReLU -> 1 output) on
fixed synthetic regression data (64 samples, batch 8, so 8 optimizer steps per epoch), no
shuffling, no dropout, optimizer ``"adam"`` (lr 1e-2) or ``"sgd"`` (lr 1e-2, momentum 0.9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

STEPS_PER_EPOCH = 8

Interrupt = tuple[int, int] | Literal["end"] | None

# One callback hook call as a callback saw it, in framework-neutral words (see ``Driver.fit``).
Hook = tuple[Any, ...]


@dataclasses.dataclass
class FitResult:
    """What one ``fit`` call did.

    Attributes:
        epochs_run: 0-based indices of the epochs whose training began in this call.
        global_step: the optimizer's step counter when the call ended.
        error: the exception ``fit`` raised (None when it returned normally).
        losses: epoch index -> the epoch's mean training loss as the framework reports it at the
            epoch's end (Keras: ``logs["loss"]``; Lightning: the epoch-aggregated ``train_loss``),
            for each epoch that ended in this call.
        hooks: with ``fit(record_hooks=True)``, every training hook call a callback received, in
            order (see ``Driver.fit``).
        best_score: with ``fit(best_checkpoint=...)``, the best score that checkpoint callback holds
            when the call ends.
    """

    epochs_run: list[int]
    global_step: int
    error: BaseException | None = None
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    hooks: list[Hook] = dataclasses.field(default_factory=list)
    best_score: float | None = None


class Driver(Protocol):
    name: str  # "keras" or "lightning", also the manifest's ``framework``
    message_logger: str | None  # where the framework's own messages go: a logger's name, or None (stdout)
    # Whether the framework calls the epoch-begin hook of an epoch resumed in its middle (Keras begins
    # every epoch fit runs; Lightning's loop counts that epoch as begun, as with its own ckpt_path).
    begins_a_resumed_epoch: bool

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
    ) -> Any:
        """A fresh model and optimizer (and whatever the framework needs to call fit).

        ``shuffle``: reshuffle the 64 samples every epoch, the framework's usual way (Keras:
        ``fit(shuffle=True)`` or the input pipeline the adapter documents as exact; Lightning:
        ``DataLoader(shuffle=True)``). ``dropout``: a Dropout layer of that rate after the hidden
        layer. ``lr_schedule``: a per-step exponential decay of the learning rate (Keras:
        ``ExponentialDecay(1e-2, decay_steps=4, decay_rate=0.9)``; Lightning: ``ExponentialLR``
        with ``gamma=0.9 ** 0.25`` stepped every optimizer step). ``accumulate``: Keras
        ``steps_per_execution``; Lightning ``accumulate_grad_batches``. ``seed`` sets the initial
        weights and every RNG the run uses; a restore must override all of them.
        """

    def fit(
        self,
        run: Any,
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
        """Train ``run`` for ``epochs`` with ``BackupAndRestore(backup_dir, save_freq=save_freq, **options)``.

        ``backup_dir=None`` trains without the callback (the control). ``interrupt=(e, b)`` raises
        ``RuntimeError("interrupt")`` just before batch ``b`` of epoch ``e``; ``interrupt="end"``
        raises it after the last epoch's backup but before the callback's end-of-fit hook (a
        callback placed before ours). ``early_stopping=True`` adds the framework's early stopping
        on the training loss with ``min_delta=1e9, patience=0``-like settings, so that training
        stops after exactly 2 epochs. ``patience=True`` adds early stopping with ``patience=3`` and a
        reduce-on-plateau of the learning rate (halved after 2 epochs without improvement; Lightning:
        torch's ``ReduceLROnPlateau(patience=1)``, its scheduler), both with an improvement of 1e9
        required: the LR halves after epochs 2 and 4, and training stops after epoch 3.
        ``backup_first``: the callback goes first in the callbacks list instead of last. The error, if
        any, is caught and returned in ``error``.

        ``record_hooks``: a callback listed first records every training hook call it receives in
        ``FitResult.hooks``: ``("train_begin",)``, ``("epoch_begin", e)``, ``("batch_begin", e, b, g)``,
        ``("batch_end", e, b, g, loss)``, ``("epoch_end", e, loss)``, ``("train_end",)``, where ``b`` is
        the batch index the framework passes, ``g`` the optimizer's step counter at that moment and
        ``loss`` the loss the hook is handed (Keras: ``logs["loss"]``, the epoch's running mean;
        Lightning: the step's loss in ``outputs``, and ``train_loss`` at the epoch's end). Keras calls
        the batch hooks once per ``steps_per_execution`` batches (``b`` of the first, then of the
        last); Lightning once per batch.

        ``best_checkpoint``: a folder where the framework's best-only checkpoint callback (Keras:
        ``ModelCheckpoint(save_best_only=True, save_weights_only=True)``; Lightning:
        ``ModelCheckpoint(save_top_k=1, save_weights_only=True)``) keeps the weights of the epoch with
        the highest training loss (``mode="max"``: the loss falls every epoch, so the best is the
        first epoch's, and a resumed run that forgot it would write over it).
        """

    def checkpoint_weights(self, folder: Path) -> list[np.ndarray]:
        """The weights in the file that ``fit(best_checkpoint=folder)`` kept, in ``weights``' order."""

    def learning_rate(self, run: Any) -> float:
        """The optimizer's learning rate now."""

    def weights(self, run: Any) -> list[np.ndarray]:
        """The model's weights as numpy arrays, in a fixed order."""

    def optimizer_state(self, run: Any) -> list[np.ndarray]:
        """The optimizer's slots (moments, momenta) and its step counter, in a fixed order."""

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
        """argv of this adapter's demo worker (``python -m <module> ...``), see README.

        ``exact=True`` adds ``--shuffle --dropout 0.2`` (reshuffled data, dropout on): the
        worker must still end bit-identical to its uninterrupted run. ``preemption``: the signals of
        ``--save-before-preemption``; ``async_backup``: ``--async-backup``.
        """
