"""The objects of a remote ``backup_dir`` (``s3://``, ``gs://``): reads, writes and the conditional
writes the lease needs, each retried with a bounded backoff.

Everything goes through fsspec (``s3fs``, ``gcsfs``), configured the store's usual way: the
environment, the store's config files, and ``storage_options`` passed through to the filesystem.
None of that is ever written into a manifest, a log line or an error: messages name the URL only,
without any ``user:password@`` it may carry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from unified_backup import _private
from unified_backup.errors import BackupError, InvalidArgumentError, UnsupportedEnvironmentError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds waited before each retry of a failed request (the last wait repeats); no retry starts once
#: ``RETRY_SECONDS`` have passed since the first attempt. s3fs and gcsfs retry inside each attempt too.
BACKOFF = (0.5, 1.0, 2.0, 4.0)
RETRY_SECONDS = 30.0
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> the pip extra that installs it
REMOTE_PROTOCOLS = tuple(EXTRAS)  # what backup_dir accepts: the stores with the lease's conditional writes
_CREDENTIALS = re.compile(r"(?<=://)[^/@]*@")


class PreconditionFailed(Exception):
    """A conditional write found the object other than expected (created, changed or removed)."""


@dataclasses.dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version (S3 ETag, GCS generation) a conditional write names."""

    data: bytes
    version: str


def is_remote(backup_dir: object) -> bool:
    """Whether ``backup_dir`` is a URL of a remote store (``file://`` and plain paths are local)."""
    text = str(backup_dir)
    return "://" in text and not text.startswith("file://")


def redact(url: str) -> str:
    """``url`` without the ``user:password@`` part, if it has one: what messages show."""
    return _CREDENTIALS.sub("", url)


class ObjectStore:
    """The objects under one URL prefix, named relative to it (``manifest.json``, ``payload-.../x``)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self._options = dict(storage_options or {})
        self._pid = -1  # the process whose filesystem ``_fs`` is: a forked or unpickled copy makes its own
        self._fs: Any = None
        self._conditional: Any = None
        self.root = self._connect()[1].rstrip("/")
        self._tidying = threading.local()  # see tidying()

    def __getstate__(self) -> dict[str, Any]:  # e.g. Lightning's ddp_spawn pickles the callback
        return {"url": self.url, "protocol": self.protocol, "_options": self._options, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _pid=-1, _fs=None, _conditional=None, _tidying=threading.local())

    @property
    def fs(self) -> Any:
        """This process's fsspec filesystem (s3fs and gcsfs are not fork-safe: one per process)."""
        if self._pid != os.getpid():
            self._connect()
        return self._fs

    @property
    def conditional(self) -> Any:
        if self._pid != os.getpid():
            self._connect()
        return self._conditional

    def _connect(self) -> tuple[Any, str]:
        try:
            import fsspec
        except ImportError as exc:
            raise UnsupportedEnvironmentError(self._missing("fsspec")) from exc
        try:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self._options)
        except ImportError as exc:
            raise UnsupportedEnvironmentError(self._missing(exc.name or "its filesystem package")) from exc
        except ValueError as exc:
            raise InvalidArgumentError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={redact(self.url)!r}, whose "
                f"protocol {self.protocol!r} fsspec does not know ({exc}). Expected a local folder, or an "
                "s3:// or gs:// URL."
            ) from exc
        self._fs, self._conditional = fs, _private.conditional_writes(fs, self.protocol)
        self._pid = os.getpid()
        return fs, root

    def __repr__(self) -> str:
        return f"ObjectStore({redact(self.url)!r})"

    def _missing(self, package: str) -> str:
        extra = EXTRAS.get(self.protocol, "s3")
        return (
            f"backup_dir={redact(self.url)!r} needs {package}, which is not installed. Expected the "
            f"store's fsspec filesystem: pip install 'unified-backup[{extra}]'."
        )

    def show(self, name: str = "") -> str:
        """The URL of ``name``, as messages show it."""
        return redact(f"{self.url}/{name}" if name else self.url)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # -- plain reads and writes -----------------------------------------------------------------
    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return self.retry(f"reading {self.show(name)}", lambda: self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Replace the object with ``data`` in one request: it is whole or absent, never partial."""
        self.retry(f"writing {self.show(name)}", lambda: self.fs.pipe_file(self.path(name), data))

    def upload(self, local: Path, name: str) -> None:
        """Upload a file (S3: in parallel parts when it is large)."""
        self.retry(f"uploading {self.show(name)}", lambda: self.fs.put_file(str(local), self.path(name)))

    def download(self, name: str, local: Path) -> None:
        self.retry(f"downloading {self.show(name)}", lambda: self.fs.get_file(self.path(name), str(local)))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{relative name: bytes}`` of every object under ``prefix`` (all of them by default)."""
        where = self.path(prefix).rstrip("/")

        def find() -> dict[str, int]:
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(where, withdirs=False, detail=True)
            except FileNotFoundError:
                return {}
            return {
                path[len(self.root) + 1 :]: int(info.get("size") or 0)
                for path, info in found.items()
                if info.get("type") != "directory" and path.startswith(self.root + "/")
            }

        return self.retry(f"listing {self.show(prefix)}", find)

    def remove(self, names: Iterable[str]) -> None:
        paths = [self.path(name) for name in names]
        if paths:
            self.retry(f"removing objects in {self.show()}", lambda: self._remove(paths))

    def _remove(self, paths: list[str]) -> None:
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass

    def reachable(self) -> None:
        """Check that the bucket exists and answers; raise ``FileNotFoundError`` naming it if it does not."""
        bucket = self.root.split("/", 1)[0]
        if not self.retry(f"looking for {self.protocol}://{bucket}", lambda: self.fs.exists(bucket)):
            raise FileNotFoundError(errno.ENOENT, f"the bucket {self.protocol}://{bucket} does not exist")

    # -- conditional writes (the lease) ---------------------------------------------------------
    def read_versioned(self, name: str) -> Versioned | None:
        return self.retry(f"reading {self.show(name)}", lambda: self.conditional.read(self.path(name)))

    def create(self, name: str, data: bytes) -> str:
        """Write ``data`` only if no such object exists (else :class:`PreconditionFailed`); its version."""
        return self.retry(
            f"creating {self.show(name)}", lambda: self.conditional.create(self.path(name), data)
        )

    def replace(self, name: str, data: bytes, version: str) -> str:
        """Write ``data`` only if the object is still at ``version`` (else :class:`PreconditionFailed`)."""
        return self.retry(
            f"replacing {self.show(name)}", lambda: self.conditional.replace(self.path(name), data, version)
        )

    def delete(self, name: str, version: str) -> None:
        """Remove the object only if it is still at ``version`` (else :class:`PreconditionFailed`)."""
        self.retry(f"removing {self.show(name)}", lambda: self.conditional.delete(self.path(name), version))

    # -- retries --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tidying(self) -> Iterator[None]:
        """Within it, this thread's requests are tried once: a clean-up after a failure that the
        next start repeats anyway should not wait for a store that is down."""
        self._tidying.on = True
        try:
            yield
        finally:
            self._tidying.on = False

    def retry(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, tried again after each of :data:`BACKOFF`'s waits while it fails transiently,
        until :data:`RETRY_SECONDS` have passed.

        Answers (a missing object, a failed precondition, a refused permission, a bad argument) are
        raised at once; anything else (connection refused or reset, timeouts, 5xx) is retried, and
        the last failure is raised as an ``OSError`` that says what was being done.
        """
        deadline = time.monotonic() + RETRY_SECONDS
        for attempt in itertools.count():
            try:
                return call()
            except _ANSWERS:
                raise
            except Exception as exc:  # noqa: BLE001 - every store raises its own transport errors
                wait = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                tidying = getattr(self._tidying, "on", False)
                if tidying or _permanent(exc) or time.monotonic() + wait > deadline:
                    raise _as_os_error(exc, what) from exc
                log.debug("Retrying %s in %.1f s after %s", what, wait, type(exc).__name__)
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


_ANSWERS = (FileNotFoundError, FileExistsError, PermissionError, PreconditionFailed, BackupError)


def _permanent(exc: Exception) -> bool:
    """Failures that a retry cannot mend: bad arguments, missing or refused credentials, a request the
    store refuses (400, 403, 501: s3fs's EINVAL, EACCES, ENOSYS), a full local disk."""
    name = type(exc).__name__
    refused = isinstance(exc, OSError) and (
        exc.errno in (errno.EINVAL, errno.EACCES, errno.ENOSYS, errno.ENOSPC) or "Forbidden" in str(exc)
    )  # "Forbidden": gcsfs's 403
    return refused or isinstance(exc, (ValueError, TypeError, NotImplementedError)) or "Credentials" in name


def _as_os_error(exc: Exception, what: str) -> OSError:
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return OSError(code, f"{what} failed: {type(exc).__name__}: {redact(str(exc))}")
