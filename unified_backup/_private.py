"""Every filesystem internal the core touches, fenced here with guard tests
(``tests/core/test_private_api.py``, ``tests/remote/test_private_api.py``): conditional writes, which
fsspec has no method for.

S3 (``s3fs``): ``S3FileSystem.call_s3``, which runs a botocore call (``put_object`` with ``IfNoneMatch``
or ``IfMatch``, ``delete_object`` with ``IfMatch``) and translates its errors.
GCS (``gcsfs``): ``GCSFileSystem.call`` and ``_location``, the JSON API's request helper and
endpoint, with ``ifGenerationMatch`` on the upload and the delete.
"""

from __future__ import annotations

from typing import Any, Protocol


class Conditional(Protocol):
    never: str  # a version no object has

    def read(self, path: str) -> Any: ...  # Versioned | None
    def create(self, path: str, data: bytes) -> str: ...
    def replace(self, path: str, data: bytes, version: str) -> str: ...
    def delete(self, path: str, version: str) -> None: ...


def conditional_writes(fs: Any, protocol: str) -> Conditional:
    """The conditional writes of ``fs`` (one of fsspec's filesystems), or a refusal when it has none."""
    if protocol in ("s3", "s3a"):
        return _S3(fs)
    if protocol in ("gs", "gcs"):
        return _GCS(fs)
    return _Refused(protocol)


def _precondition(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a store's "412 Precondition Failed" or "409 conflict"."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if getattr(seen, "code", None) in (409, 412):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Store:
    """A filesystem's conditional writes, by (bucket, key)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _key(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key


class _S3(_Store):
    never = '"00000000000000000000000000000000"'  # an ETag no object has: a write on it must fail

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        _check_botocore()

    def read(self, path: str) -> Any:
        from unified_backup.store import Versioned

        bucket, key = self._key(path)
        try:
            out = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return Versioned(_body(self.fs, out["Body"]), str(out["ETag"]))

    def _put(self, path: str, data: bytes, **condition: str) -> str:
        from unified_backup.store import PreconditionFailed

        bucket, key = self._key(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError, OSError) as exc:
            gone = isinstance(exc, FileNotFoundError) and "IfMatch" in condition  # S3: 404 for If-Match
            if gone or isinstance(exc, FileExistsError) or _precondition(exc):
                raise PreconditionFailed(str(exc)) from exc
            raise
        self.fs.invalidate_cache(path)
        return str(out["ETag"])

    def create(self, path: str, data: bytes) -> str:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, version: str) -> str:
        return self._put(path, data, IfMatch=version)

    def delete(self, path: str, version: str) -> None:
        from unified_backup.store import PreconditionFailed

        bucket, key = self._key(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return
        except OSError as exc:
            if _precondition(exc):
                raise PreconditionFailed(str(exc)) from exc
            raise
        self.fs.invalidate_cache(path)


def _check_botocore() -> None:
    """s3fs drops the arguments its botocore's S3 model lacks: without ``IfNoneMatch`` and ``IfMatch``
    (botocore before late 2024, or ``DeleteObject`` before 2025) the lease's writes would be plain."""
    import botocore.session

    from unified_backup.errors import UnsupportedEnvironmentError

    model = botocore.session.get_session().get_service_model("s3")
    needed = {"PutObject": ("IfNoneMatch", "IfMatch"), "DeleteObject": ("IfMatch",)}
    missing = [
        f"{operation}.{name}"
        for operation, names in needed.items()
        for name in names
        if name not in model.operation_model(operation).input_shape.members
    ]
    if missing:
        raise UnsupportedEnvironmentError(
            f"This botocore ({botocore.__version__}) has no {', '.join(missing)}: the conditional writes "
            "that keep two trainings off one s3:// backup_dir. Expected a recent one: pip install -U "
            "'unified-backup[s3]' (s3fs, aiobotocore, botocore)."
        )


def _body(fs: Any, body: Any) -> bytes:
    """The bytes of a botocore streaming body that ``call_s3`` returned (read on fsspec's loop)."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return bytes(await stream.read())

    return sync(fs.loop, read)


class _GCS(_Store):
    never = "1"  # a generation no live object has (generations are microsecond timestamps)

    def read(self, path: str) -> Any:
        from unified_backup.store import Versioned

        bucket, key = self._key(path)
        try:
            info = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            generation = str(info["generation"])
            _, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)
        except FileNotFoundError:
            return None
        return Versioned(bytes(data), generation)

    def _upload(self, path: str, data: bytes, generation: str) -> str:
        from unified_backup.store import PreconditionFailed

        bucket, key = self._key(path)
        try:
            out = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="media",
                name=key,
                ifGenerationMatch=generation,
                headers={"Content-Type": "application/octet-stream"},
                data=data,
                json_out=True,
            )
        except FileExistsError as exc:  # gcsfs's translation of 412
            raise PreconditionFailed(str(exc)) from exc
        self.fs.invalidate_cache(path)
        return str(out["generation"])

    def create(self, path: str, data: bytes) -> str:
        return self._upload(path, data, "0")

    def replace(self, path: str, data: bytes, version: str) -> str:
        return self._upload(path, data, version)

    def delete(self, path: str, version: str) -> None:
        from unified_backup.store import PreconditionFailed

        bucket, key = self._key(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except FileNotFoundError:
            return
        except FileExistsError as exc:
            raise PreconditionFailed(str(exc)) from exc
        self.fs.invalidate_cache(path)


class _Refused:
    """A store without the conditional writes a lease needs: a lock on it is refused (see ``lease.py``)."""

    never = ""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def _refuse(self, *_: Any) -> Any:
        from unified_backup.errors import UnsupportedEnvironmentError

        raise UnsupportedEnvironmentError(
            f"{self.protocol}:// has no conditional writes that unified-backup knows, so two trainings "
            "on one backup_dir could not be kept apart. Expected s3://, gs:// or a local folder; mount "
            "the store and pass the mounted path instead."
        )

    read = create = replace = delete = _refuse
