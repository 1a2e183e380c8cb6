"""Whether a backup_dir's lock is held, seen from outside the library: its ``flock``, not its file.

The lock file stays after a ``fit`` that stopped early (the mark of a run that did not finish), so
"released" is checked on the lock itself.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from unified_backup.lock import LOCK_NAME


def lock_is_free(folder: Path) -> bool:
    """Whether no open file (of this process or another) holds the flock of ``folder``'s lock file."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
