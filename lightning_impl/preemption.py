"""``save_before_preemption`` in Lightning: whose signal handler runs, and what a preempted run says.

What Lightning 2.6 does on its own: after ``on_fit_start`` it installs a SIGTERM handler (chaining
the one in place) that logs, forwards SIGTERM to the ranks its launcher started, broadcasts a flag
from rank 0 (a collective, inside the handler) and sets ``trainer.received_sigterm``. Its loops
then raise ``SIGTERMException`` (a ``SystemExit`` with no code: the process exits 0) after the
current batch, or at the end of the epoch or of a validation batch, without saving anything. Under
DDP a SIGTERM that reaches only rank 1 stops rank 1 alone and rank 0 fails in its next collective.
Lightning puts the handlers back when ``fit`` ends (before ``on_fit_end``, after ``on_exception``).

So for the training (``on_train_start`` to ``on_train_end``) the signals the user lists are taken
over from Lightning: :class:`PreemptionWatch` records them and calls the handler that was in place
before ``fit`` (the one Lightning itself chains), not Lightning's, so that Lightning neither stops
before the backup nor runs a collective from a signal handler. The processes then agree at each
step boundary (``Coordinator.any``) and stop together after committing the backup. Under
``strategy="ddp"``, rank 0 first keeps Lightning's launcher from SIGKILLing it when the other ranks
exit with 143 (``_private.spare_from_child_process_observer``), so that it exits with 143 too.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import Any

from lightning_impl import _private
from lightning_impl.coordinator import LightningCoordinator
from unified_backup.preemption import PreemptionWatch

log = logging.getLogger(__name__)


class LightningPreemption:
    """The preemption watch of one ``fit``, driven by ``BackupAndRestore``'s hooks."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self._before: dict[signal.Signals, Any] = {}
        self._watch: PreemptionWatch | None = None

    def fit_start(self) -> None:
        """``on_fit_start``, before Lightning installs its handlers: note the ones in place, to chain them."""
        self._before = {sig: signal.getsignal(sig) for sig in self.signals}

    def train_start(self, trainer: Any) -> None:
        """``on_train_start``: take the signals over from Lightning until ``on_train_end``.

        A SIGTERM that Lightning recorded since ``on_fit_start`` (e.g. during the sanity check) is taken
        over too, so that the run still stops at its first step boundary with a backup.
        """
        watch = PreemptionWatch(self.signals)
        watch.check_installable()
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        watch.install()  # chains the handlers noted at fit start, and puts them back at uninstall
        self._watch = watch
        if signal.SIGTERM in self.signals and _private.clear_received_sigterm(trainer):
            watch.received = signal.SIGTERM

    def agreed(self, coordinator: LightningCoordinator) -> bool:
        """True on every process once any process received a signal (a collective: every rank calls it)."""
        return self._watch is not None and self._watch.agreed(coordinator)

    def received_by(self, coordinator: LightningCoordinator) -> str:
        """The signals received, and by which ranks when several processes train (a collective)."""
        mine = self._watch.received.name if self._watch and self._watch.received else None
        seen = coordinator.gather(mine)
        names = sorted({name for name in seen if name})
        if len(seen) == 1:
            return " and ".join(names)
        ranks = ", ".join(str(rank) for rank, name in enumerate(seen) if name)
        return f"{' and '.join(names)} (received by rank {ranks})"

    def train_end(self) -> None:
        """``on_train_end``: nothing is left to stop; say so if a signal came as the training finished."""
        if self._watch is not None and self._watch.received is not None:
            log.warning(
                "%s received as the training finished: no step was left to run, so fit ends normally.",
                self._watch.received.name,
            )
        self.close()

    def close(self) -> None:
        """Put back the handlers that were in place before ``fit`` (Lightning's are restored by Lightning)."""
        if self._watch is not None:
            self._watch.uninstall()
            self._watch = None
