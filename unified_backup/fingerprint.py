"""Fingerprints: what a backup holds, as ``{variable name: "dtype[shape]"}``, compared before loading.

Adapters describe model and optimizer variables (and the optimizer class) under keys such as
``model/dense/kernel`` or ``optimizer/class``; the core only compares the two mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from unified_backup.errors import IncompatibleBackupError

_SHOWN = 8


def describe(dtype: object, shape: Iterable[int | None]) -> str:
    """The canonical text for one variable, e.g. ``float32[3, 4]``."""
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"


def differences(stored: Mapping[str, str], live: Mapping[str, str]) -> list[str]:
    """Lines naming each variable that differs between a backup and the live training."""
    lines = []
    for name in sorted(stored.keys() | live.keys()):
        if name not in live:
            lines.append(f"{name}: in the backup ({stored[name]}) but not in the training")
        elif name not in stored:
            lines.append(f"{name}: in the training ({live[name]}) but not in the backup")
        elif stored[name] != live[name]:
            lines.append(f"{name}: backup has {stored[name]}, training has {live[name]}")
    return lines


def check(stored: Mapping[str, str], live: Mapping[str, str], source: str) -> None:
    """Raise :class:`IncompatibleBackupError` naming the differing variables, if any."""
    lines = differences(stored, live)
    if not lines:
        return
    shown = "\n  ".join(lines[:_SHOWN])
    more = f"\n  ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    raise IncompatibleBackupError(
        f"The backup in {source} was written for a different model or optimizer; "
        f"{len(lines)} variable(s) differ:\n  {shown}{more}\n"
        "Nothing was loaded. Restore the original model and optimizer to resume, "
        "or delete the backup (`unified-backup delete BACKUP_DIR`) (or use another backup_dir) to "
        "start fresh."
    )
