"""The ``unified-backup`` command: inspect and verify a backup, or run the demo.

unified-backup inspect DIR [--json]   what the committed backup holds
unified-backup verify DIR             check every file against the manifest (exit 1 if bad)
unified-backup demo [--frameworks ...] train, SIGKILL, resume, compare (the main job)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from unified_backup.errors import BackupError, NoBackupError
from unified_backup.manifest import Manifest
from unified_backup.slot import Slot

EXIT_BAD = 1


def _committed(directory: str) -> tuple[Slot, Manifest]:
    slot = Slot(directory)
    if not slot.directory.is_dir():
        raise NoBackupError(f"{directory} does not exist. Expected a backup_dir written by BackupAndRestore.")
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
        return 0
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
    return 0


def _previous(slot: Slot) -> Manifest | None:
    """The previous backup kept by ``keep_previous=True``; None if none (or unreadable: verify says)."""
    try:
        return slot.read_previous()
    except BackupError:
        return None


def _verify(args: argparse.Namespace) -> int:
    slot, manifest = _committed(args.dir)
    slot.verify(manifest)
    print(f"OK: {_verified(manifest)}")
    try:  # kept by keep_previous=True: the fallback must be sound too
        previous = slot.read_previous()
        if previous is not None:
            slot.verify(previous, record=slot.previous_path)
    except BackupError as exc:
        raise type(exc)(f"The newest backup is sound, but the previous one is not: {exc}") from exc
    if previous is not None:
        print(f"OK (previous backup): {_verified(previous)}")
    return 0


def _verified(manifest: Manifest) -> str:
    return (
        f"{len(manifest.files)} file(s), {manifest.total_bytes:,} bytes match their "
        f"{manifest.checksum_algorithm} checksums ({manifest.framework}, {manifest.epoch} epoch(s) done, "
        f"global step {manifest.global_step})."
    )


FRAMEWORKS = ("keras", "tf_keras", "lightning")  # the demo's workers (unified_backup.demo.WORKERS)


def _demo(args: argparse.Namespace) -> int:
    from unified_backup import demo

    return demo.run(
        args.frameworks, kills=args.kills, epochs=args.epochs, seed=args.seed, workdir=args.workdir
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unified-backup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="summarise the committed backup in DIR")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(func=_inspect)
    verify = sub.add_parser("verify", help="check every file of the backup in DIR against its checksum")
    verify.add_argument("dir")
    verify.set_defaults(func=_verify)
    demo = sub.add_parser(
        "demo", help="train, SIGKILL and resume in Keras 3, tf_keras and Lightning, then compare"
    )
    demo.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    demo.add_argument("--kills", type=int, default=3, help="SIGKILLs per framework (default 3)")
    demo.add_argument("--epochs", type=int, default=12, help="epochs per training (default 12)")
    demo.add_argument("--seed", type=int, default=None, help="seed for the kill instants (default: random)")
    demo.add_argument("--workdir", default=None, help="where backups go (default: a temporary folder)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except BackupError as exc:
        print(f"unified-backup {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
