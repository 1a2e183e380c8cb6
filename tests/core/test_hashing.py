"""Checksums computed while a file is written (``unified_backup.hashing``) are the commit's checksums."""

import errno
import hashlib

import numpy as np
import pytest

from unified_backup import BackupOptions, CorruptBackupError, Counters, Lifecycle, Slot
from unified_backup.hashing import CHUNK, HashingWriter

from .conftest import FakeState, epoch_end


@pytest.mark.parametrize("sizes", [[], [1], [CHUNK], [CHUNK + 1, 3], [3 * CHUNK + 5, 0, 7]])
def test_the_digest_is_the_sha256_of_what_was_written(tmp_path, sizes):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    path = tmp_path / "f.bin"
    with open(path, "wb") as f, HashingWriter(f) as writer:
        for i, piece in enumerate(pieces):  # bytes, and buffers of other item sizes
            written = writer.write(piece.tobytes() if i % 2 else piece.view(np.uint8))
            assert written == piece.nbytes
        digest = writer.hexdigest()
    assert path.read_bytes() == b"".join(p.tobytes() for p in pieces)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_write_keeps_its_oserror():
    with open("/dev/full", "wb", buffering=0) as f, HashingWriter(f) as writer:
        with pytest.raises(OSError) as raised:
            writer.write(b"x" * 100)
    assert raised.value.errno == errno.ENOSPC and writer.error is raised.value


class ChecksummingState(FakeState):
    """Returns the checksum of its weights file, as an adapter that hashes while writing does."""

    def save(self, directory, position, coordinator):
        super().save(directory, position, coordinator)
        return {"weights.bin": self.digest}


def test_the_commit_takes_the_states_checksums_and_reads_only_the_other_files(backup_dir):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), ChecksummingState()
    lifecycle.start(state)
    state.digest = hashlib.sha256(b"w1").hexdigest()
    manifest = epoch_end(lifecycle, state, b"w1", Counters(1, 0, 8))
    assert manifest.files["weights.bin"].checksum == state.digest
    assert manifest.files["sub/extra.bin"].checksum == hashlib.sha256(b"1w").hexdigest()  # read and hashed
    state.digest = "0" * 64  # a digest the commit does not check: it is taken as given
    manifest = epoch_end(lifecycle, state, b"w2", Counters(2, 0, 16))
    assert manifest.files["weights.bin"].checksum == "0" * 64
    lifecycle.finish(success=False)
    with pytest.raises(CorruptBackupError, match="fails its sha256 check"):
        Slot(backup_dir).verify(manifest)


def test_a_buffer_the_caller_reuses_after_write_is_hashed_as_written(tmp_path):
    """torch.save hands over an internal buffer and refills it once ``write`` returns."""
    buffer = bytearray(b"a" * (2 * CHUNK + 3))
    path = tmp_path / "f.bin"
    with open(path, "wb") as f, HashingWriter(f) as writer:
        writer.write(buffer)
        buffer[:] = b"b" * len(buffer)
        writer.write(memoryview(buffer)[:10])
        digest = writer.hexdigest()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
