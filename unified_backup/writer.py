"""The background writer of ``async_backup``: one backup's write and commit at a time, in a thread.

Training hands it a snapshot already copied out of the live state, so nothing the thread writes
can change under it; the lifecycle waits for it before the next backup, before a preemption backup
and when ``fit`` ends, and hears then what it raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundWriter:
    """Runs one call at a time in a daemon thread and keeps what it raised for :meth:`wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a call is in flight (or done, but not waited for)."""
        return self._thread is not None

    def start(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the background; the previous call must have been waited for."""
        if self._thread is not None:
            raise RuntimeError("BackgroundWriter.start() while a write is in flight; wait() first.")

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # handed to the training thread by wait()
                self._failure = exc

        # A daemon: an interpreter that exits without ``fit`` ending (os._exit aside) must not hang on
        # it; the commit is atomic, so an abandoned write leaves the previous backup committed.
        self._thread = threading.Thread(target=run, name="unified-backup-writer", daemon=True)
        self._thread.start()

    def wait(self) -> BaseException | None:
        """Wait for the call in flight, if any; return what it raised (once), or None."""
        if self._thread is not None:
            self._thread.join()  # interrupted (Ctrl-C): still busy, waited for again later
            self._thread = None
        failure, self._failure = self._failure, None
        return failure
