"""``save_before_preemption`` in Lightning: whose signal handler runs, and what a preempted run says.

What Lightning 2.6 does on its own: after ``on_fit_start`` it installs a SIGTERM handler (chaining
the one in place) that logs, forwards SIGTERM to the ranks its launcher started, broadcasts a flag
from rank 0 (a collective, inside the handler) and sets ``trainer.received_sigterm``. Its loops
then raise ``SIGTERMException`` (a ``SystemExit`` with no code: the process exits 0) after the
current batch, or at the end of the epoch or of a validation batch, without saving anything. Under
DDP a SIGTERM that reaches only rank 1 stops rank 1 alone and rank 0 fails in its next collective.
Lightning puts the handlers back when ``fit`` ends (before ``on_fit_end``, after ``on_exception``).

So from ``on_train_start`` to the end of ``fit`` the signals the user lists are taken over from
Lightning: :class:`LightningWatch` records them and calls the handler that was in place before
``fit`` (the one Lightning itself chains), not Lightning's, so that Lightning neither stops before
the backup nor runs a collective from a signal handler. The lifecycle then has the processes agree
at each step boundary and stop together after committing the backup. Under ``strategy="ddp"``,
rank 0 first keeps Lightning's launcher from SIGKILLing it when the other ranks exit with 143
(``_private.spare_from_child_process_observer``), so that it exits with 143 too.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from lightning_impl import _private
from unified_backup.preemption import PreemptionWatch


class LightningWatch(PreemptionWatch):
    """The preemption watch of one ``Trainer.fit``; made in ``on_fit_start``, before Lightning's handlers."""

    def __init__(self, signals: Sequence[signal.Signals], trainer: Any) -> None:
        super().__init__(signals)
        self._trainer = trainer
        self._before = {sig: signal.getsignal(sig) for sig in self.signals}  # to chain, as Lightning does

    def take_over(self) -> None:
        """``on_train_start``: take the signals over from Lightning until ``fit`` ends.

        A SIGTERM that Lightning recorded since ``on_fit_start`` (e.g. during the sanity check) is taken
        over too, so that the run still stops at its first step boundary with a backup.
        """
        self.check_installable()
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.install()  # chains the handlers noted at fit start, and puts them back at uninstall
        if signal.SIGTERM in self.signals and _private.clear_received_sigterm(self._trainer):
            self.received = signal.SIGTERM

    def before_stop(self) -> None:
        _private.spare_from_child_process_observer()  # before the other ranks can exit
