"""Every bad backup the contract names, as a case: damage a real backup, resume, return the outcome.

``test_bad_inputs.py`` asserts each case for both adapters; ``benchmarks/bad_inputs.py`` prints the
table (case -> error raised). Each case starts from a backup made by a real interrupted ``fit``
(epoch 2 of 4), damages it, and resumes with a new run. A case passes only if the resume raised the
expected error naming the expected thing, left the weights untouched, and changed no file of the
backup (nothing loaded, nothing deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.harness import Worker
from unified_backup import (
    BackupDirInUseError,
    CorruptBackupError,
    IncompatibleBackupError,
    InvalidBackupError,
    Manifest,
    Slot,
    UnsafeBackupError,
    UnsupportedFormatError,
)
from unified_backup.lock import LOCK_NAME
from unified_backup.manifest import FileEntry


@dataclasses.dataclass
class Outcome:
    error: BaseException | None
    expected: tuple[type[BaseException], ...]
    names: str  # what the message must name
    weights_unchanged: bool
    files_unchanged: bool

    @property
    def ok(self) -> bool:
        return (
            isinstance(self.error, self.expected)
            and self.names in str(self.error)
            and self.weights_unchanged
            and self.files_unchanged
        )


def make_backup(driver: Any, backup_dir: Path) -> Manifest:
    result = driver.fit(driver.new_run(seed=0), backup_dir, epochs=4, interrupt=(2, 1))
    assert isinstance(result.error, RuntimeError), result.error
    manifest = Slot(backup_dir).read_manifest()
    assert manifest is not None and manifest.epoch == 2
    return manifest


def snapshot(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def resume(driver: Any, backup_dir: Path, run_args: dict | None = None, reader: Any = None) -> tuple:
    reader = reader or driver
    run = reader.new_run(seed=1, **(run_args or {}))
    weights = reader.weights(run)
    before = snapshot(backup_dir)
    result = reader.fit(run, backup_dir, epochs=4)
    same = all(np.array_equal(a, b) for a, b in zip(weights, reader.weights(run), strict=True))
    return result.error, same, snapshot(backup_dir) == before


def largest(manifest: Manifest) -> str:
    return max(manifest.files, key=lambda name: manifest.files[name].bytes)


def rewrite(backup_dir: Path, name: str, data: bytes) -> None:
    """Replace a payload file and re-seal the manifest, so that only the loader can refuse it."""
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    (slot.payload_dir(manifest) / name).write_bytes(data)
    files = dict(manifest.files, **{name: FileEntry(len(data), hashlib.sha256(data).hexdigest())})
    slot.manifest_path.write_text(dataclasses.replace(manifest, files=files).to_json())


def _damage_payload(how: str) -> Callable[[Any, Path], Outcome]:
    def case(driver: Any, backup_dir: Path) -> Outcome:
        manifest = make_backup(driver, backup_dir)
        name = largest(manifest)
        path = Slot(backup_dir).payload_dir(manifest) / name
        data = path.read_bytes()
        if how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif how.startswith("flipped"):
            at = {"flipped-first": 0, "flipped-middle": len(data) // 2, "flipped-last": len(data) - 1}[how]
            path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
        elif how == "missing":
            path.unlink()
        else:  # extra
            name = "planted.bin"
            (path.parent / name).write_bytes(b"not ours")
        return Outcome(*_resumed(driver, backup_dir, (CorruptBackupError,), name))

    return case


def _resumed(driver, backup_dir, expected, names, **kw):
    error, same, unchanged = resume(driver, backup_dir, **kw)
    return error, expected, names, same, unchanged


def manifest_flipped(driver: Any, backup_dir: Path) -> Outcome:
    make_backup(driver, backup_dir)
    path = backup_dir / "manifest.json"
    data = bytearray(path.read_bytes())
    at = data.index(b'"global_step"') + len(b'"global_step": ')
    data[at] ^= 0x01  # a digit of the step counter: still valid JSON
    path.write_bytes(bytes(data))
    return Outcome(*_resumed(driver, backup_dir, (CorruptBackupError,), "manifest.json"))


def future_version(driver: Any, backup_dir: Path) -> Outcome:
    make_backup(driver, backup_dir)
    path = backup_dir / "manifest.json"
    path.write_text(path.read_text().replace('"version": 1', '"version": 2'))
    return Outcome(*_resumed(driver, backup_dir, (UnsupportedFormatError,), "version 2"))


def changed_architecture(driver: Any, backup_dir: Path) -> Outcome:
    make_backup(driver, backup_dir)
    return Outcome(
        *_resumed(driver, backup_dir, (IncompatibleBackupError,), "model/", run_args={"width": 16})
    )


def changed_optimizer(driver: Any, backup_dir: Path) -> Outcome:
    make_backup(driver, backup_dir)
    outcome = _resumed(
        driver, backup_dir, (IncompatibleBackupError,), "optimizer/", run_args={"optimizer": "sgd"}
    )
    return Outcome(*outcome)


def other_framework(driver: Any, backup_dir: Path, other: Any) -> Outcome:
    make_backup(other, backup_dir)
    return Outcome(*_resumed(driver, backup_dir, (IncompatibleBackupError,), f"written by {other.name}"))


SENTINEL = "pwned.txt"


class _Planted:
    """Unpickling this creates a file: what a malicious backup would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def planted_pickle(driver: Any, backup_dir: Path) -> Outcome:
    manifest = make_backup(driver, backup_dir)
    sentinel = backup_dir.parent / SENTINEL
    rewrite(backup_dir, largest(manifest), pickle.dumps(_Planted(sentinel)))
    # A loader may refuse the file as unsafe (Lightning: torch.load(weights_only=True)) or as not a
    # checkpoint at all (Keras: TensorFlow reads no pickles); it must never run it.
    outcome = Outcome(
        *_resumed(driver, backup_dir, (UnsafeBackupError, CorruptBackupError), largest(manifest))
    )
    outcome.files_unchanged = outcome.files_unchanged and not sentinel.exists()
    return outcome


def second_live_run(driver: Any, backup_dir: Path) -> Outcome:
    out = backup_dir.parent / "first.json"
    first = Worker(driver.demo_command(backup_dir, out, epochs=50, batch_sleep=0.1))
    try:
        assert first.wait_event("start", 300) is not None, first.failure()
        run = driver.new_run()
        weights = driver.weights(run)
        result = driver.fit(run, backup_dir, epochs=2)
        same = all(np.array_equal(a, b) for a, b in zip(weights, driver.weights(run), strict=True))
        alive = first.proc.poll() is None
    finally:
        first.kill()
    return Outcome(result.error, (BackupDirInUseError,), f"pid {first.proc.pid}", same, alive)


CASES: dict[str, Callable[..., Outcome]] = {
    "payload truncated": _damage_payload("truncated"),
    "payload byte flipped (first)": _damage_payload("flipped-first"),
    "payload byte flipped (middle)": _damage_payload("flipped-middle"),
    "payload byte flipped (last)": _damage_payload("flipped-last"),
    "payload file missing": _damage_payload("missing"),
    "extra file in the payload": _damage_payload("extra"),
    "manifest byte flipped": manifest_flipped,
    "manifest from a future version": future_version,
    "changed architecture": changed_architecture,
    "changed optimizer class": changed_optimizer,
    "backup of the other framework": other_framework,
    "payload needing unpickling": planted_pickle,
    "second live run on the same dir": second_live_run,
}
NEEDS_OTHER = {"backup of the other framework"}

assert all(issubclass(e, InvalidBackupError) for e in (CorruptBackupError, UnsafeBackupError))
