"""A GCS JSON-API server on 127.0.0.1 for the tests: gcp-storage-emulator, run as its own process.

``python tests/remote/gcs_server.py PORT DATA_DIR BUCKET`` serves until killed; its objects live in
DATA_DIR, so a server started again on the same folder still has them (as a restarted GCS would).

gcp-storage-emulator ignores the ``ifGenerationMatch`` precondition, which GCS documents for uploads
and deletes (``0``: the object must not exist; N: its live generation must be N; else ``412
Precondition Failed``). This process adds it to the emulator's upload and delete handlers, so that
the lease's conditional writes meet what GCS does. Nothing else of the emulator is changed.
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage: Any, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _checked(handler: Any, name_of: Any) -> Any:
    lock = threading.Lock()  # the check and the write are one step, as on GCS

    def checked(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = request.query.get("ifGenerationMatch")
        if not wanted:
            return handler(request, response, storage, *args, **kwargs)
        with lock:
            if _generation(storage, request.params["bucket_name"], name_of(request)) != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
            return handler(request, response, storage, *args, **kwargs)

    return checked


def _upload_name(request: Any) -> str:
    if "name" in request.query:
        return request.query["name"][0]
    return request.data["meta"].get("name")


def main() -> None:
    port, data_dir, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    wrapped = {
        objects.insert: _checked(objects.insert, _upload_name),
        objects.delete: _checked(objects.delete, lambda request: request.params["object_id"]),
    }
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = wrapped.get(handler, handler)
    app = server.create_server("127.0.0.1", port, in_memory=False, default_bucket=bucket, data_dir=data_dir)
    app.run()


if __name__ == "__main__":
    main()
