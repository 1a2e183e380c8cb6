"""The ``unified-backup`` command: inspect, verify or delete a backup, or run the demo.

Exit codes, the same for every command (``EXIT_*`` below): 0 done; 1 the backup is damaged or
refused, or the folder is in use; 2 wrong usage (bad arguments, a file given where a folder is
expected); 3 no backup (the folder does not exist or holds no committed backup).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_backup import __version__
from unified_backup.errors import BackupError, InvalidArgumentError, NoBackupError
from unified_backup.lock import LOCK_NAME, DirectoryLock
from unified_backup.manifest import Manifest
from unified_backup.options import check_url
from unified_backup.remote_slot import RemoteSlot
from unified_backup.slot import CREATED_NAME, Slot
from unified_backup.store import is_remote

EXIT_OK = 0
EXIT_BAD = 1  # the backup is damaged or refused, or another failure the message names
EXIT_USAGE = 2  # argparse's code for bad arguments; also a file where a folder is expected
EXIT_NO_BACKUP = 3  # nothing committed: not the same as damaged

EPILOG = """\
exit codes:
  0  done (verify: every file matches its checksum)
  1  the backup is damaged or refused, or backup_dir is in use by a live training
  2  wrong usage: bad arguments, or DIR is a file, not a folder
  3  no backup: DIR does not exist or holds no committed backup (delete: nothing of the
     library's to remove)
"""


def _folder(directory: str) -> Slot | RemoteSlot:
    """The slot in ``directory``; a file there is a usage error, not a missing backup."""
    if is_remote(directory):  # configured the store's usual way: environment, config files
        check_url(directory)
        return RemoteSlot(directory)
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(
            f"{directory} is a file, not a backup folder. Expected the backup_dir given to "
            "BackupAndRestore (a folder holding manifest.json)."
        )
    return Slot(path)


def _committed(directory: str) -> tuple[Slot | RemoteSlot, Manifest]:
    slot = _folder(directory)
    if isinstance(slot, Slot) and not slot.directory.is_dir():
        raise NoBackupError(
            f"{directory} does not exist. Expected the backup_dir given to BackupAndRestore; a finished "
            "training deletes its backup, an interrupted one leaves it there."
        )
    manifest = slot.read_manifest()
    if manifest is None:
        raise NoBackupError(
            f"{directory} holds no committed backup (no manifest.json). A finished training deletes its "
            "backup; an interrupted one leaves it here."
        )
    return slot, manifest


def _inspect(args: argparse.Namespace) -> int:
    slot, manifest = _committed(args.dir)
    if args.json:
        sys.stdout.write(manifest.to_json())
        return EXIT_OK
    model = sum(1 for key in manifest.fingerprint if key.startswith("model/"))
    optimizer = sum(1 for key in manifest.fingerprint if key.startswith("optimizer/"))
    rows = [
        ("backup", str(slot.payload_dir(manifest))),
        ("framework", f"{manifest.framework} {manifest.framework_version}"),
        ("created", manifest.created_at),
        (
            "progress",
            f"{manifest.epoch} epoch(s) done, step {manifest.step_in_epoch} of the next, "
            f"global step {manifest.global_step}",
        ),
        ("state", f"{model} model and {optimizer} optimizer entries in the fingerprint"),
        (
            "files",
            f"{len(manifest.files)} file(s), {manifest.total_bytes:,} bytes, {manifest.checksum_algorithm}",
        ),
        ("format", f"{manifest.format} v{manifest.version}"),
    ]
    previous = _previous(slot)
    if previous is not None:
        rows.append(("previous", f"{slot.payload_dir(previous)} (global step {previous.global_step})"))
    for name, value in rows:
        print(f"{name:>10}  {value}")
    return EXIT_OK


def _previous(slot: Slot | RemoteSlot) -> Manifest | None:
    """The previous backup kept by ``keep_previous=True``; None if none (or unreadable: verify says)."""
    try:
        return slot.read_previous()
    except BackupError:
        return None


def _verify(args: argparse.Namespace) -> int:
    slot, manifest = _committed(args.dir)
    try:  # a remote backup is downloaded into a temporary folder, removed here
        slot.verify(manifest)
        try:  # kept by keep_previous=True: the fallback must be sound too
            previous = slot.read_previous()
            if previous is not None:
                slot.verify(previous, record=slot.previous_path)
        except BackupError as exc:
            raise type(exc)(f"The newest backup is sound, but the previous one is not: {exc}") from exc
    finally:
        slot.cleanup()
    if args.json:
        _print_json(args.dir, EXIT_OK, backup=_summary(manifest), previous=previous and _summary(previous))
        return EXIT_OK
    print(f"OK: {_verified(manifest)}")
    if previous is not None:
        print(f"OK (previous backup): {_verified(previous)}")
    return EXIT_OK


def _summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "payload": manifest.payload,
        "framework": manifest.framework,
        "framework_version": manifest.framework_version,
        "created_at": manifest.created_at,
        "epoch": manifest.epoch,
        "step_in_epoch": manifest.step_in_epoch,
        "global_step": manifest.global_step,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "checksum_algorithm": manifest.checksum_algorithm,
    }


def _verified(manifest: Manifest) -> str:
    return (
        f"{len(manifest.files)} file(s), {manifest.total_bytes:,} bytes match their "
        f"{manifest.checksum_algorithm} checksums ({manifest.framework}, {manifest.epoch} epoch(s) done, "
        f"global step {manifest.global_step})."
    )


def _delete(args: argparse.Namespace) -> int:
    """Remove the library's files from ``args.dir`` under its lock; the user's files stay."""
    slot = _folder(args.dir)
    if isinstance(slot, RemoteSlot):
        return _delete_remote(slot, args.dir)
    if not slot.directory.is_dir():
        raise NoBackupError(f"{args.dir} does not exist: nothing to delete.")
    stale_lock = (slot.directory / LOCK_NAME).exists()  # left by a run that did not finish; removed below
    lock = DirectoryLock(slot.directory)
    lock.acquire()  # a live training keeps its backup: BackupDirInUseError
    before = {entry.name for entry in slot.directory.iterdir()}
    try:
        removed = slot.delete()
    except OSError:
        gone = before - {entry.name for entry in slot.directory.iterdir()} - {LOCK_NAME}
        print(f"Deleted from {args.dir} before the failure: {', '.join(sorted(gone)) or 'nothing'}.")
        raise
    finally:
        lock.release()
    if stale_lock:
        removed.append(LOCK_NAME)
    slot.prune()  # the folder itself, only if the library made it and nothing else is in it
    if not slot.directory.exists():
        what = ", ".join(removed) or "empty"
        print(f"Deleted {args.dir}: the library made it and it held nothing else ({what}).")
        return EXIT_OK
    if not removed:
        raise NoBackupError(f"{args.dir} holds no backup files: nothing deleted; your files are untouched.")
    kept = sorted(p.name for p in slot.directory.iterdir() if p.name != CREATED_NAME)
    print(f"Deleted from {args.dir}: {', '.join(removed)}.")
    if kept:
        print(f"Left in place (not the library's backup): {', '.join(kept)}.")
    return EXIT_OK


def _delete_remote(slot: RemoteSlot, url: str) -> int:
    """Remove the library's objects under ``url``, holding its lease; the user's objects stay."""
    lease = slot.lock()
    lease.acquire()  # a live training keeps its backup: BackupDirInUseError
    try:
        removed = slot.delete()
    finally:
        lease.release()  # and the lease goes too
    if not removed:
        raise NoBackupError(f"{url} holds no backup objects: nothing deleted; your objects are untouched.")
    print(f"Deleted from {url}: {', '.join(removed)}.")
    return EXIT_OK


FRAMEWORKS = ("keras", "tf_keras", "lightning")  # the demo's workers (unified_backup.demo.WORKERS)


def _demo(args: argparse.Namespace) -> int:
    from unified_backup import demo

    return demo.run(
        args.frameworks,
        kills=args.kills,
        epochs=args.epochs,
        seed=args.seed,
        workdir=args.workdir,
        picture=args.picture,
    )


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unified-backup",
        description="Inspect, verify or delete the backup that BackupAndRestore keeps in a folder, "
        "or run the demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    folder = (
        "the backup_dir given to BackupAndRestore: a folder, or an s3:// or gs:// URL (the store is "
        "configured its usual way: environment variables, config files)"
    )

    inspect = sub.add_parser(
        "inspect", help="summarise the committed backup in DIR", description=_wrap("Summarise the committed "
        "backup in DIR: framework, progress (epoch, step), files and sizes."), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    inspect.add_argument("dir", metavar="DIR", help=folder)
    inspect.add_argument("--json", action="store_true", help="print the manifest itself, as JSON")
    inspect.set_defaults(func=_inspect)

    verify = sub.add_parser(
        "verify", help="check every file of the backup in DIR against its checksum",
        description=_wrap("Check every file of the committed backup in DIR (and of the previous one, "
        "if kept) against the size "
        "and checksum its manifest records. Nothing is changed."), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    verify.add_argument("dir", metavar="DIR", help=folder)
    verify.add_argument(
        "--json", action="store_true", help='print one JSON object: {"ok", "exit_code", "backup", '
        '"previous", "error"}, on success and on failure',
    )  # fmt: skip
    verify.set_defaults(func=_verify)

    delete = sub.add_parser(
        "delete", help="remove the backup in DIR (only the library's files), e.g. a damaged one",
        description=_wrap("Remove the library's files from DIR (manifest.json, manifest.previous.json, "
        "payload-*/, temporary files) while holding its lock, as a finished training does; refused "
        "while a live training uses DIR. Your own files stay, and so does the folder unless the "
        "library made it."), epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    delete.add_argument("dir", metavar="DIR", help=folder)
    delete.set_defaults(func=_delete)

    demo = sub.add_parser(
        "demo", help="train, SIGKILL and resume in Keras 3, tf_keras and Lightning, then compare",
        description="Train a small model in each framework once uninterrupted and once killed with "
        "SIGKILL at random instants and restarted until it finishes; compare the final weights and "
        "draw both loss curves (a PNG; needs matplotlib).",
    )  # fmt: skip
    demo.add_argument(
        "--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS, metavar="NAME",
        help=f"which to run, among {', '.join(FRAMEWORKS)} (default: all)",
    )  # fmt: skip
    demo.add_argument("--kills", type=int, default=3, help="SIGKILLs per framework (default 3)")
    demo.add_argument("--epochs", type=int, default=12, help="epochs per training (default 12)")
    demo.add_argument("--seed", type=int, default=None, help="seed for the kill instants (default: random)")
    demo.add_argument(
        "--workdir", default=None, help="folder for the backups, results and picture (default: a new "
        "temporary folder)",
    )  # fmt: skip
    demo.add_argument(
        "--no-picture", dest="picture", action="store_false", help="do not draw the loss curves"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except (BackupError, OSError) as exc:  # OSError: e.g. manifest.json is a folder, or unreadable
        code = _exit_code(exc)
        if getattr(args, "json", False) and args.command == "verify":
            _print_json(args.dir, code, error={"type": type(exc).__name__, "message": str(exc)})
        else:
            print(f"unified-backup {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return code


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, NoBackupError):
        return EXIT_NO_BACKUP
    if isinstance(exc, InvalidArgumentError):
        return EXIT_USAGE
    return EXIT_BAD


def _print_json(directory: str, code: int, **fields: Any) -> None:
    body = {"ok": code == EXIT_OK, "exit_code": code, "backup_dir": directory, "backup": None}
    body.update(previous=None, error=None)
    body.update(fields)
    sys.stdout.write(json.dumps(body, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
