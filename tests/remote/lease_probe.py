"""A job that only takes the lease of a remote backup_dir: ``python -m tests.remote.lease_probe URL
OPTIONS_JSON HOLD_SECONDS``. Prints ``acquired`` and holds the lease HOLD_SECONDS (renewing it),
then releases it as a finished run; or prints ``refused: <message>``."""

from __future__ import annotations

import json
import sys
import time

from unified_backup.errors import BackupDirInUseError
from unified_backup.lease import Lease
from unified_backup.store import ObjectStore


def main() -> None:
    url, options, hold = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    lease = Lease(ObjectStore(url, options))
    try:
        lease.acquire()
    except BackupDirInUseError as exc:
        print(f"refused: {exc}", flush=True)
        return
    print("acquired", flush=True)
    time.sleep(hold)
    lease.release(finished=True)


if __name__ == "__main__":
    main()
