"""Preemption: on SIGTERM (and signals the user names), back up at the next step and stop.

An adapter installs a :class:`PreemptionWatch` (a subclass where its framework handles signals
itself) when ``fit`` starts and hands it to the lifecycle, which asks :meth:`PreemptionWatch.agreed`
at every step boundary and, once it says yes, commits a backup of that step, logs
:func:`stop_message` and raises :class:`TrainingPreempted`, which ends the process with exit code
:data:`EXIT_PREEMPTED` unless caught.

NOTE: in multi-process runs every process calls ``agreed`` at every step boundary: a signal seen
by any process stops all of them at the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from unified_backup.coordinator import Coordinator
from unified_backup.errors import BackupError, InvalidArgumentError, UnsupportedEnvironmentError
from unified_backup.manifest import Counters

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job that ended on SIGTERM
log = logging.getLogger(__name__)
_Handler = Callable[[int, FrameType | None], Any] | int | None


class TrainingPreempted(BackupError, SystemExit):
    """Training stopped on a preemption signal after committing a backup.

    Derives from ``SystemExit`` so that, uncaught, the process ends quietly with ``EXIT_PREEMPTED``.
    """

    def __init__(self, message: str) -> None:
        SystemExit.__init__(self, EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_signals(value: bool | Iterable[int | str]) -> tuple[signal.Signals, ...]:
    """``True`` -> (SIGTERM,); an iterable of names or numbers -> those signals; ``False`` -> ()."""
    if value is False:
        return ()
    if value is True:
        return (signal.SIGTERM,)
    try:
        names = list(value)
        if not names:
            raise ValueError("no signal listed")
        parsed = (signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in names)
        return tuple(dict.fromkeys(parsed))  # each once, in the order given
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"Invalid value for argument `save_before_preemption`. Received: {value!r}. Expected True "
            "(SIGTERM), False, or a list of signals such as ['SIGTERM', 'SIGUSR1']."
        ) from exc


class PreemptionWatch:
    """Records the arrival of preemption signals while installed; restores the old handlers after."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, _Handler] = {}

    @staticmethod
    def check_installable() -> None:
        """Raise if handlers cannot be installed here (only Python's main thread may install them)."""
        if threading.current_thread() is not threading.main_thread():
            raise UnsupportedEnvironmentError(
                "save_before_preemption needs to install signal handlers, which Python allows only in the "
                "main thread; fit runs in another thread. Run fit in the main thread, or pass "
                "save_before_preemption=False."
            )

    def install(self) -> None:
        self.check_installable()
        self.uninstall()  # installing twice would make the handler chain to itself
        self.received = None
        for sig in self.signals:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        previous = self._previous.get(self.received)
        # Chain e.g. Lightning's own SIGTERM bookkeeping, but not Python's Ctrl-C handler: it would
        # raise KeyboardInterrupt here, before the backup.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def agreed(self, coordinator: Coordinator) -> bool:
        """True on every process once any process has received a signal (call at step boundaries)."""
        return coordinator.any(self.received is not None)

    def before_stop(self) -> None:
        """Called on every process once the processes agreed to stop, before the last collective."""

    def stopping(self, received: list[str | None], primary: bool, committed: bool) -> None:
        """Called on every process after the stop's backup, with the signal each process received
        (by rank) and whether that backup was committed, before the ``fit`` ends: e.g. to have the
        scheduler requeue the job. It must not raise; every process then waits for the others."""


def cause(received: list[str | None]) -> str:
    """What every process received (``Coordinator.gather``), e.g. ``"SIGTERM (received by rank 1)"``."""
    names = " and ".join(sorted({name for name in received if name})) or "a preemption signal"
    if len(received) == 1:
        return names
    ranks = ", ".join(str(rank) for rank, name in enumerate(received) if name)
    return f"{names} (received by rank {ranks})"


def stop_message(cause: str, counters: Counters, backup_dir: object, committed: bool) -> str:
    """The one line a preempted run logs in both adapters, and the message of ``TrainingPreempted``.

    Args:
        cause: the signal, e.g. ``"SIGTERM"`` or ``"SIGTERM (received by rank 1)"``.
        counters: where training stopped.
        committed: whether the backup of that step was committed (False: its write failed and
            ``on_write_error="warn"`` let training go on, so the folder keeps the previous one).
    """
    where = (
        f"global step {counters.global_step} ({counters.epoch} epoch(s) done, "
        f"{counters.step_in_epoch} step(s) into the next)"
    )
    if committed:
        done = f"backed up {where} to {backup_dir} and stopped training"
    else:
        done = f"stopped training at {where}; the backup failed (see above), {backup_dir} keeps the last one"
    return (
        f"Preempted by {cause}: {done}; exit code {EXIT_PREEMPTED} (TrainingPreempted). "
        "Run the same training again to resume from there."
    )
