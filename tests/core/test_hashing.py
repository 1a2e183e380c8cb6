"""Checksums computed while a file is written (``unified_backup.hashing``) are the commit's checksums."""

import errno
import hashlib
import io
import threading

import numpy as np
import pytest

from unified_backup import BackupError, BackupOptions, CorruptBackupError, Counters, Lifecycle, Slot
from unified_backup.hashing import CHUNK, SMALL, HashingWriter

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


class Trickle(io.RawIOBase):
    """An unbuffered file that takes at most 1000 bytes per write, as a raw or network file may."""

    def __init__(self, path):
        super().__init__()
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()

    def writable(self):
        return True

    def write(self, data):
        return self._file.write(memoryview(data)[:1000])

    def close(self):
        self._file.close()
        super().close()


def test_short_writes_are_written_to_the_end_and_counted(tmp_path):
    data = bytes(range(256)) * 20 + b"x" * (SMALL + 5)
    with Trickle(tmp_path / "f.bin") as f, HashingWriter(f) as writer:
        writer.write(data[:5000])
        writer.write(data[5000:])
        assert writer.written == len(data)
        digest = writer.hexdigest()
    assert (tmp_path / "f.bin").read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_small_writes_are_hashed_without_a_helper_thread_and_a_closed_writer_refuses(tmp_path):
    with open(tmp_path / "f.bin", "wb") as f, HashingWriter(f) as writer:
        for _ in range(100):
            writer.write(b"header")
        assert not [t for t in threading.enumerate() if t.name.startswith("unified-backup-hash")]
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"late")


def test_a_checksum_of_a_file_the_state_did_not_write_is_an_adapter_bug(backup_dir):
    class Inventing(FakeState):
        def save(self, directory, position, coordinator):
            super().save(directory, position, coordinator)
            return {"other.bin": "0" * 64}

    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), Inventing()
    lifecycle.start(state)
    with pytest.raises(BackupError, match="other.bin, which it did not write"):
        epoch_end(lifecycle, state, b"w", Counters(1, 0, 8))
