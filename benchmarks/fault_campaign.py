"""Fault campaign: SIGKILL real trainings at random instants, half of them inside the backup write.

For each adapter (Keras 3, tf_keras, Lightning), its demo worker (``unified_backup.demo.WORKERS``)
trains a model whose state is about ``--state-mb`` MB. The campaign kills it with SIGKILL, restarts
it, and repeats until the training completes, then starts a new training; ``--trials`` kills per
adapter in all. Half of the kills are aimed inside the backup write: the campaign watches
``backup_dir`` for the lifecycle's staging folder (a ``payload-*`` folder that the manifest does not
name yet) and kills at a random instant before the commit is expected to end. Each trial is
classified by what the next start restores:

    newest      the newest committed backup (what the manifest named at the kill)
    older       an older backup than the newest committed one
    scratch     a fresh start although a backup was committed
    load-error  the restart failed to load
Each completed training's final weights are compared with an uninterrupted run (``wrong`` if
they differ), ``backup_dir`` must be gone after it (``leftovers`` otherwise), and the workers'
private ``TMPDIR`` must be empty at the end (``tmp left`` otherwise). With ``--keep-previous`` the
workers keep a second slot, and after every kill its record must still verify (``prev bad``
otherwise); without it that column shows ``-``.

    python benchmarks/fault_campaign.py --trials 200            # the full campaign (about an hour)
    python benchmarks/fault_campaign.py --trials 6 --state-mb 5  # a smoke run (CI runs this size)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.harness

from tests.harness import WORKERS, Worker, worker_argv  # noqa: E402
from unified_backup.errors import InvalidBackupError  # noqa: E402
from unified_backup.slot import PAYLOAD_PREFIX, Slot  # noqa: E402

KILLS_PER_TRAINING = 4
TIMEOUT = 600.0


def hidden_units(state_mb: float) -> int:
    """Hidden width of the 4 -> H -> 1 MLP whose weights and two Adam moments take ``state_mb`` MB."""
    return max(16, int(state_mb * 1e6 / (3 * 6 * 4)))


def campaign_argv(framework: str, backup_dir: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return worker_argv(
        framework,
        backup_dir,
        out,
        epochs=args.epochs,
        save_freq=args.save_freq,
        hidden=hidden_units(args.state_mb),
        keep_previous=args.keep_previous,
        async_backup=args.async_backup,
    )


def final_digest(out: Path) -> str:
    return json.loads(out.read_text())["weights_sha256"]


def staging_started(backup_dir: Path, committed: set[str]) -> bool:
    try:
        names = (p.name for p in backup_dir.iterdir())
        return any(name.startswith(PAYLOAD_PREFIX) and name not in committed for name in names)
    except FileNotFoundError:
        return False


def committed_payloads(backup_dir: Path) -> set[str]:
    """The payload folders a manifest names: the newest backup's and (keep_previous) the previous one's."""
    slot = Slot(backup_dir)
    return {m.payload for m in (slot.read_manifest(), slot.read_previous()) if m is not None}


def newest_step(backup_dir: Path) -> int | None:
    manifest = Slot(backup_dir).read_manifest()
    return manifest.global_step if manifest else None


def previous_is_bad(backup_dir: Path) -> bool:
    """With keep_previous: the previous backup's record exists but it would be refused."""
    slot = Slot(backup_dir)
    try:
        previous = slot.read_previous()
        if previous is not None:
            slot.verify(previous, record=slot.previous_path)
    except InvalidBackupError:
        return True
    return False


def temp_leftovers(tmpdir: Path) -> int:
    """Files the workers left in their TMPDIR (e.g. a temp copy of a checkpoint cut by the kill).

    Not counted: ``__autograph_generated_file*.py``, the source TensorFlow's autograph writes for
    tf_keras's train function and deletes only at a normal exit (a SIGKILL leaves it; not ours).
    """
    return sum(1 for p in tmpdir.rglob("*") if p.is_file() and not p.name.startswith(AUTOGRAPH))


AUTOGRAPH = "__autograph_generated_file"


def campaign(framework: str, args: argparse.Namespace, rng: random.Random, root: Path) -> dict:
    say = lambda text: print(f"[{framework}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    reference_out = root / f"{framework}-reference.json"
    began = time.monotonic()
    worker = Worker(campaign_argv(framework, root / f"{framework}-reference", reference_out, args))
    if worker.finish(TIMEOUT) != 0:
        raise RuntimeError(f"reference run failed:\n{worker.failure()}")
    expected = final_digest(reference_out)
    write_time = max(0.05, args.state_mb / 300.0)  # generous bound of one backup's write + checksum
    counts: collections.Counter[str] = collections.Counter()
    aimed = trainings = wrong = leftovers = previous_bad = 0
    trial = 0
    while trial < args.trials:
        trainings += 1
        backup_dir, out = root / f"{framework}-run-{trainings}", root / f"{framework}-run-{trainings}.json"
        pending: tuple[int | None, str] | None = None  # (newest committed global step at the kill, how aimed)
        kills = 0
        while True:
            worker = Worker(campaign_argv(framework, backup_dir, out, args))
            start = worker.wait_event("start", TIMEOUT)
            if pending is not None:
                newest, _ = pending
                if start is None:
                    counts["load-error"] += 1
                    say(f"trial {trial}: restart failed to load:\n{worker.failure()}")
                    worker.finish(TIMEOUT)
                    break
                restored = start.get("global_step") if start.get("restored_epoch") is not None else None
                if restored == newest:  # None == None: nothing was committed, and it started fresh
                    counts["newest"] += 1
                elif restored is None:
                    counts["scratch"] += 1
                else:
                    counts["older"] += 1
                pending = None
            elif start is None:
                raise RuntimeError(f"worker did not start:\n{worker.failure()}")
            if kills >= KILLS_PER_TRAINING or trial >= args.trials:
                if worker.finish(TIMEOUT) != 0:
                    counts["load-error"] += 1
                    say(f"training {trainings} failed:\n{worker.failure()}")
                break
            committed = committed_payloads(backup_dir)
            if rng.random() < 0.5:  # aim inside the write: wait for the staging folder, then kill
                deadline = time.monotonic() + TIMEOUT
                while not staging_started(backup_dir, committed) and worker.proc.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, write_time))
                how = "in-write"
            else:
                time.sleep(rng.uniform(0, args.epochs * args.epoch_seconds))
                how = "anywhere"
            if worker.proc.poll() is not None:  # finished before the kill landed
                break
            worker.kill()
            kills += 1
            trial += 1
            aimed += how == "in-write"
            pending = (newest_step(backup_dir), how)
            previous_bad += args.keep_previous and previous_is_bad(backup_dir)
        if out.exists():
            wrong += final_digest(out) != expected
            leftovers += backup_dir.exists()
        say(f"training {trainings} done; {trial}/{args.trials} kills so far")
    return {
        "framework": framework,
        "trials": trial,
        "aimed_in_write": aimed,
        "trainings": trainings,
        "outcomes": dict(counts),
        "wrong_final_weights": wrong,
        "leftovers": leftovers,
        "previous_bad": previous_bad if args.keep_previous else None,
        "temp_files_left": temp_leftovers(Path(os.environ["TMPDIR"])),
        "wall_s": round(time.monotonic() - began, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=list(WORKERS), choices=sorted(WORKERS))
    parser.add_argument("--trials", type=int, default=200, help="SIGKILLs per adapter")
    parser.add_argument("--state-mb", type=float, default=100.0, help="size of weights + optimizer state")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument(
        "--epoch-seconds", type=float, default=1.0, help="rough epoch length, for 'anywhere' kills"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--keep-previous", action="store_true", help="train with keep_previous=True; check the second slot"
    )
    parser.add_argument(
        "--async-backup", action="store_true", help="train with async_backup=True (background writes)"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fault-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for framework in args.frameworks:
        tmpdir = root / f"{framework}-tmp"  # the workers' TMPDIR (inherited through Worker's environment)
        tmpdir.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(tmpdir)
        results.append(campaign(framework, args, rng, root))
    print(
        f"{'adapter':<10} {'kills':>5} {'in write':>8} {'newest':>6} {'older':>5} {'scratch':>7} "
        f"{'load err':>8} {'wrong':>5} {'leftover':>8} {'tmp left':>8} {'prev bad':>8} {'wall s':>7}"
    )
    failed = False
    for r in results:
        o = r["outcomes"]
        print(
            f"{r['framework']:<10} {r['trials']:>5} {r['aimed_in_write']:>8} {o.get('newest', 0):>6} "
            f"{o.get('older', 0):>5} {o.get('scratch', 0):>7} {o.get('load-error', 0):>8} "
            f"{r['wrong_final_weights']:>5} {r['leftovers']:>8} {r['temp_files_left']:>8} "
            f"{'-' if r['previous_bad'] is None else r['previous_bad']:>8} {r['wall_s']:>7}"
        )
        failed |= o.get("newest", 0) != r["trials"] or r["wrong_final_weights"] > 0
        failed |= r["leftovers"] > 0 or r["temp_files_left"] > 0 or bool(r["previous_bad"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
