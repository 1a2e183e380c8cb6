"""Checksums computed while a payload file is written, so that the commit need not read it again.

A state that writes a file through :class:`HashingWriter` hands the digest to the lifecycle (the
return value of ``TrainingState.save``); the commit then only makes the file durable. Within each
write, the hash of a chunk runs in a helper thread while the next chunk is written: ``hashlib`` and
file writes both release the GIL, so on two cores a large write costs little more than the write.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from unified_backup.manifest import CHECKSUM_ALGORITHM

CHUNK = 8 << 20  # bytes hashed per task: large enough for hashlib to release the GIL, small for overlap


class HashingWriter(io.RawIOBase):
    """A writable file that passes every byte to ``file`` and checksums it on the way.

    ``hexdigest()`` (after the last write) is the manifest's checksum of what was written. The
    ``OSError`` of a failed write is kept as ``error`` too: some writers (``torch.save``) replace it
    with their own exception.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self._digest = hashlib.new(CHECKSUM_ALGORITHM)
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unified-backup-hash")
        self._pending: Future[None] | None = None
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Write ``data``, hashing each chunk while the next is written; every byte of ``data`` is
        hashed before this returns (a caller may reuse its buffer then: ``torch.save`` does)."""
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), CHUNK):
                chunk = view[start : start + CHUNK]
                self._wait()  # in order, one chunk ahead at most
                self._pending = self._hasher.submit(self._digest.update, chunk)
                self._file.write(chunk)
        except OSError as exc:
            self.error = exc
            raise
        finally:
            self._wait()
        return len(view)

    def hexdigest(self) -> str:
        """The checksum of every byte written so far."""
        self._wait()
        return self._digest.hexdigest()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._hasher.shutdown(wait=True)
            super().close()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
