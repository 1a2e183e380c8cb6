"""Guards for the filesystem internals that ``unified_backup/_private.py`` uses (conditional writes):
if an s3fs or gcsfs release renames or changes them, these fail before the lease does. Their behaviour
against real servers: ``tests/remote/test_private_api.py``."""

from __future__ import annotations

import inspect

import pytest


def test_s3fs_runs_botocore_calls_and_gcsfs_has_its_request_helper():
    s3fs = pytest.importorskip("s3fs")
    gcsfs = pytest.importorskip("gcsfs")
    for name in ("call_s3", "split_path", "invalidate_cache"):
        assert callable(getattr(s3fs.S3FileSystem, name)), name
    for name in ("call", "split_path", "invalidate_cache"):
        assert callable(getattr(gcsfs.GCSFileSystem, name)), name
    assert "json_out" in inspect.signature(gcsfs.GCSFileSystem._call).parameters
    assert isinstance(inspect.getattr_static(gcsfs.GCSFileSystem, "_location"), property)


def test_this_botocore_knows_the_conditional_writes():
    pytest.importorskip("botocore")
    from unified_backup import _private

    _private._check_botocore()  # raises UnsupportedEnvironmentError when a condition is missing
