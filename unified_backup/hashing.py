"""Checksums computed while a payload file is written, so that the commit need not read it again.

A state that writes a file through :class:`HashingWriter` hands the digest to the lifecycle (the
return value of ``TrainingState.save``); the commit then only makes the file durable. A large write
is hashed chunk by chunk in a helper thread while the same chunk is written (``hashlib`` and file
writes both release the GIL, so on two cores it costs little more than the write); a small one is
hashed in the caller's thread, where a hand-off would cost more than the hash.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from unified_backup.manifest import CHECKSUM_ALGORITHM

CHUNK = 8 << 20  # bytes hashed per task: large enough for hashlib to release the GIL, small for overlap
SMALL = 1 << 20  # writes below this are hashed in the caller's thread


class HashingWriter(io.RawIOBase):
    """A writable file that passes every byte to ``file`` and checksums it on the way.

    ``hexdigest()`` is the manifest's checksum of what was written and ``written`` its size. The
    ``OSError`` of a failed write is kept as ``error`` too: some writers (``torch.save``) replace it
    with their own exception. Every byte of a ``write`` is hashed and written before it returns (a
    caller may reuse its buffer then: ``torch.save`` does).
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self._digest = hashlib.new(CHECKSUM_ALGORITHM)
        self._hasher: ThreadPoolExecutor | None = None  # made for the first large write
        self._pending: Future[None] | None = None
        self.written = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed HashingWriter")
        view = memoryview(data).cast("B")
        try:
            if len(view) < SMALL:
                self._digest.update(view)
                self._write_all(view)
            for start in range(0, len(view) if len(view) >= SMALL else 0, CHUNK):
                chunk = view[start : start + CHUNK]
                self._pending = self._helper().submit(self._digest.update, chunk)
                self._write_all(chunk)
                self._wait()  # in order: the next chunk is hashed after this one
        except OSError as exc:
            self.error = exc
            raise
        finally:
            self._wait()
        return len(view)

    def hexdigest(self) -> str:
        """The checksum of every byte written so far."""
        return self._digest.hexdigest()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
            super().close()

    def _write_all(self, view: memoryview) -> None:
        """Write all of ``view``, however many calls a raw or non-blocking file needs."""
        while len(view):
            count = self._file.write(view)
            if count is None:  # a non-blocking file that would block
                raise BlockingIOError(0, "the file would block")
            self.written += count
            view = view[count:]

    def _helper(self) -> ThreadPoolExecutor:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unified-backup-hash")
        return self._hasher

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
