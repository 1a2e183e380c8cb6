"""Guards for the filesystem internals that ``unified_backup/_private.py`` uses (conditional writes):
if an s3fs or gcsfs release renames or changes them, these fail before the lease does."""

from __future__ import annotations

import pytest

from unified_backup import _private
from unified_backup.store import ObjectStore, PreconditionFailed


def test_each_conditional_write_is_refused_when_its_precondition_fails(remote):
    store = remote.store
    assert isinstance(store.conditional, (_private._S3, _private._GCS))
    first = store.create("probe", b"1")
    with pytest.raises(PreconditionFailed):
        store.create("probe", b"2")
    with pytest.raises(PreconditionFailed):
        store.replace("probe", b"2", "0" if remote.server.protocol == "gs" else '"not-the-etag"')
    second = store.replace("probe", b"2", first)
    assert store.read_versioned("probe").data == b"2" and second != first
    with pytest.raises(PreconditionFailed):
        store.delete("probe", first)
    store.delete("probe", second)
    assert store.read_versioned("probe") is None
    with pytest.raises(PreconditionFailed):  # S3 answers 404 here, GCS 412: both mean "not yours"
        store.replace("probe", b"3", second)


def test_a_store_without_conditional_writes_is_refused_by_name():
    pytest.importorskip("fsspec")
    store = ObjectStore("memory://bucket/prefix")
    with pytest.raises(Exception, match="memory:// has no conditional writes"):
        store.create("probe", b"1")
