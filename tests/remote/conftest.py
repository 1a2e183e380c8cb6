"""Real S3 and GCS servers on 127.0.0.1 (see ``servers.py``), one of each for the session, and a
fresh ``backup_dir`` URL in them for each test."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("gcsfs")
pytest.importorskip("moto")
pytest.importorskip("gcp_storage_emulator")

from tests.remote.servers import BUCKET, GCSServer, S3Server, unique_url  # noqa: E402
from unified_backup.store import ObjectStore  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    server = GCSServer(tmp_path_factory.mktemp("gcs-data"))
    server.start()
    yield server
    server.stop()


@dataclasses.dataclass
class Remote:
    """One test's remote ``backup_dir``: its URL, the server behind it, and a store to look inside."""

    url: str
    server: Any
    store: ObjectStore

    @property
    def options(self) -> dict[str, Any]:
        """The callback's ``storage_options`` for this server."""
        return {"storage_options": self.server.storage_options}

    def objects(self) -> dict[str, bytes]:
        """Every object under the URL but the lease, with its bytes."""
        names = sorted(self.store.sizes())
        return {name: self.store.read(name) or b"" for name in names if name != ".unified-backup.lock"}


@pytest.fixture(params=["s3", "gs"])
def remote(request) -> Remote:
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    url = unique_url(server)
    return Remote(url, server, ObjectStore(url, server.storage_options))
