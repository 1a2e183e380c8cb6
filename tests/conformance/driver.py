"""The per-framework driver that the conformance scenarios run against.

Each adapter supplies one ``Driver`` (``keras_driver.py``, ``lightning_driver.py``); scenarios in
``test_contract.py`` are written once against this interface and assert the same outcome for both.

The standard run: a small deterministic MLP (4 inputs -> ``width`` hidden, ReLU -> 1 output) on
fixed synthetic regression data (64 samples, batch 8, so 8 optimizer steps per epoch), no
shuffling, no dropout, optimizer ``"adam"`` (lr 1e-2) or ``"sgd"`` (lr 1e-2, momentum 0.9).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

STEPS_PER_EPOCH = 8

Interrupt = tuple[int, int] | Literal["end"] | None


@dataclasses.dataclass
class FitResult:
    """What one ``fit`` call did.

    Attributes:
        epochs_run: 0-based indices of the epochs whose training began in this call.
        global_step: the optimizer's step counter when the call ended.
        error: the exception ``fit`` raised (None when it returned normally).
    """

    epochs_run: list[int]
    global_step: int
    error: BaseException | None = None


class Driver(Protocol):
    name: str  # "keras" or "lightning", also the manifest's ``framework``

    def new_run(self, *, seed: int = 0, width: int = 8, optimizer: str = "adam") -> Any:
        """A fresh model and optimizer (and whatever the framework needs to call fit)."""

    def fit(
        self,
        run: Any,
        backup_dir: Path | None,
        *,
        epochs: int,
        save_freq: str | int = "epoch",
        interrupt: Interrupt = None,
        early_stopping: bool = False,
    ) -> FitResult:
        """Train ``run`` for ``epochs`` with ``BackupAndRestore(backup_dir, save_freq=save_freq)``.

        ``backup_dir=None`` trains without the callback (the control). ``interrupt=(e, b)`` raises
        ``RuntimeError("interrupt")`` just before batch ``b`` of epoch ``e``; ``interrupt="end"``
        raises it after the last epoch's backup but before the callback's end-of-fit hook (a
        callback placed before ours). ``early_stopping=True`` adds the framework's early stopping
        on the training loss with ``min_delta=1e9, patience=0``-like settings, so that training
        stops after exactly 2 epochs. The error, if any, is caught and returned in ``error``.
        """

    def weights(self, run: Any) -> list[np.ndarray]:
        """The model's weights as numpy arrays, in a fixed order."""

    def demo_command(self, backup_dir: Path, out: Path, *, epochs: int, batch_sleep: float) -> list[str]:
        """argv of this adapter's demo worker (``python -m <adapter>.demo ...``), see README."""
