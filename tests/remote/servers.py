"""Real object-store servers on 127.0.0.1 for the remote ``backup_dir`` tests.

S3: moto's server (``ThreadedMotoServer``) in the test process; its objects live in moto's backend
in this process, so a server stopped and started again on the same port still has them.
GCS: gcp-storage-emulator in its own process (``gcs_server.py``), its objects in a folder, so a
killed server started again still has them.

Each server hands out the two ways a training is configured: ``storage_options`` (passed through
to fsspec by the callback) and ``env`` (the store's usual environment variables, for the demo
workers the tests run as subprocesses).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BUCKET = "backups"
S3_KEY, S3_SECRET = "test-key-id", "s3-secret-that-must-never-be-shown"  # moto accepts any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError as exc:
            if getattr(exc, "code", None) is not None:  # an HTTP error is an answer: the server is up
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server at {url} did not start") from exc
            time.sleep(0.1)


class S3Server:
    protocol = "s3"

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_until_up(self.endpoint)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> None:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)


class GCSServer:
    protocol = "gs"

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(__file__).with_name("gcs_server.py")
        self._process = subprocess.Popen(
            [sys.executable, str(script), str(self.port), str(self.data_dir), BUCKET],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until_up(self.endpoint + "/")

    def stop(self) -> None:
        """Kill the server (SIGKILL): it answers nothing more until started again."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=30)
            self._process = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "test"}

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def make_bucket(self, name: str) -> None:
        import fsspec

        fs = fsspec.filesystem("gs", skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)


def unique_url(server: S3Server | GCSServer) -> str:
    """A fresh prefix in the server's bucket: one test's backup_dir."""
    return f"{server.protocol}://{BUCKET}/run-{uuid.uuid4().hex[:12]}"


def subprocess_env(server: S3Server | GCSServer) -> dict[str, str]:
    return {**os.environ, **server.env}
