import json

import pytest

from unified_backup import CorruptBackupError, Manifest, UnsupportedFormatError
from unified_backup.manifest import VERSION, FileEntry


def make() -> Manifest:
    return Manifest(
        framework="keras",
        framework_version="3.15.1",
        epoch=3,
        step_in_epoch=2,
        global_step=26,
        fingerprint={"model/dense/kernel": "float32[4, 8]"},
        files={"ckpt-1.index": FileEntry(10, "ab" * 32)},
        payload="payload-x",
    )


def test_round_trip_keeps_every_field():
    manifest = make()
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    body = json.loads(manifest.to_json())
    required = {
        "format",
        "version",
        "framework",
        "framework_version",
        "epoch",
        "step_in_epoch",
        "global_step",
        "created_at",
        "fingerprint",
        "files",
    }
    assert required <= body.keys()
    assert body["format"] == "unified-backup" and body["version"] == VERSION
    assert body["files"]["ckpt-1.index"] == {"bytes": 10, "checksum": "ab" * 32}
    assert body["created_at"].endswith("+00:00")


def test_future_version_is_refused_naming_both_versions():
    body = json.loads(make().to_json())
    body["version"] = 7
    with pytest.raises(UnsupportedFormatError, match=r"version 7.*reads version 1"):
        Manifest.from_json(json.dumps(body))


def test_foreign_json_is_refused():
    with pytest.raises(UnsupportedFormatError, match="not a unified-backup manifest"):
        Manifest.from_json(json.dumps({"epoch": 1}))


def test_altered_field_fails_the_manifest_checksum():
    text = make().to_json().replace('"epoch": 3', '"epoch": 4')
    with pytest.raises(CorruptBackupError, match="fails its own checksum"):
        Manifest.from_json(text)


def test_truncated_manifest_is_corrupt():
    with pytest.raises(CorruptBackupError, match="not valid JSON"):
        Manifest.from_json(make().to_json()[:40])


def test_every_single_bit_flip_of_the_manifest_is_refused():
    text = make().to_json().encode()
    for i in range(len(text)):
        for bit in (0x01, 0x20):
            flipped = bytearray(text)
            flipped[i] ^= bit
            try:
                decoded = bytes(flipped).decode("utf-8")
            except UnicodeDecodeError:
                continue  # Slot.read_manifest refuses undecodable bytes as CorruptBackupError
            try:
                Manifest.from_json(decoded)
            except (CorruptBackupError, UnsupportedFormatError):
                continue
            assert Manifest.from_json(decoded) == make(), f"flip of bit {bit:#x} at byte {i} was accepted"
