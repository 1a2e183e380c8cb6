"""The preemption watch of a Keras ``fit``: its handlers step aside once that ``fit`` is gone.

Keras calls no callback hook when an exception leaves ``fit``, so the handlers that
``BackupAndRestore`` installed at ``on_train_begin`` cannot be removed then. Instead each handler
checks, when a signal arrives, that the ``fit`` that installed it is still on the main thread's
stack. If it is not, the handler restores the handlers it replaced and gives the signal to them,
as if it had never been installed: SIGTERM then ends the process, a user's handler runs, and so on.
Nothing is swallowed after a failed ``fit``. The next ``fit`` with the callback installs afresh.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

from keras_impl import _private
from unified_backup.preemption import PreemptionWatch


class FitWatch(PreemptionWatch):
    """A :class:`PreemptionWatch` bound to the running ``fit`` whose callbacks include ``callback``."""

    def __init__(self, signals: Iterable[signal.Signals], callback: Any) -> None:
        super().__init__(signals)
        self._callback = callback
        self._fit_code = _private.fit_code(callback)

    def fit_running(self) -> bool:
        """Whether the ``fit`` that made this watch is on the stack of the thread that asks."""
        if self._fit_code is None:  # hooks called outside fit: trust them to end it
            return True
        return _private.fit_is_running(self._fit_code, self._callback)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.fit_running():
            super()._on_signal(signum, frame)
            return
        sig = signal.Signals(signum)
        previous = self._previous.get(sig)
        if signal.getsignal(sig) == self._on_signal:  # still installed: step aside, then pass it on
            self.uninstall()
            if previous is None or previous == signal.SIG_DFL:
                signal.raise_signal(sig)  # its default action, e.g. SIGTERM ends the process
                return
        if callable(previous):  # also when a later watch, installed over this one, chains to it
            previous(signum, frame)
