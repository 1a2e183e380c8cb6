"""Other callbacks across a resume, side by side for every adapter: a markdown table.

For each adapter (Keras 3, tf_keras, Lightning) it runs the conformance drivers' standard training
three times: uninterrupted; interrupted by an exception at epoch 2, batch 3 (the backup is at the
end of epoch 1); and resumed by a fresh process-like ``fit`` with another seed. The runs carry an
early stopping (patience 3) and a reduce-on-plateau of the learning rate (halve after 2 epochs),
both needing an improvement of 1e9, and a best-only checkpoint of the highest training loss. A
second part resumes at step 12 (epoch 1, 4 batches in) and compares every callback hook call with
the uninterrupted run's.

    python benchmarks/callback_parity.py [--adapters keras tf_keras lightning]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conformance.conftest import DRIVERS, load_driver  # noqa: E402
from tests.conformance.test_hooks import from_backup_on  # noqa: E402


def callback_state_row(name: str, work: Path) -> str:
    driver = load_driver(name)
    reference = driver.new_run(seed=0)
    expected = driver.fit(
        reference, work / "reference", epochs=8, patience=True, best_checkpoint=work / "reference-best"
    )
    backup = work / "backup"
    first = driver.fit(
        driver.new_run(seed=0),
        backup,
        epochs=8,
        patience=True,
        interrupt=(2, 3),
        best_checkpoint=work / "best",
    )
    assert first.error is not None
    run = driver.new_run(seed=1)
    resumed = driver.fit(run, backup, epochs=8, patience=True, best_checkpoint=work / "best")
    same_weights = all(
        np.array_equal(a, b) for a, b in zip(driver.weights(run), driver.weights(reference), strict=True)
    )
    same_file = all(
        np.array_equal(a, b)
        for a, b in zip(
            driver.checkpoint_weights(work / "best"),
            driver.checkpoint_weights(work / "reference-best"),
            strict=True,
        )
    )
    return (
        f"| {name} | {expected.epochs_run[-1]} | {driver.learning_rate(reference):g} "
        f"| {expected.best_score:.6f} "
        f"| {resumed.epochs_run[-1]} (ran {resumed.epochs_run}) | {driver.learning_rate(run):g} "
        f"| {resumed.best_score:.6f} | {'yes' if same_file else 'NO'} | {'yes' if same_weights else 'NO'} |"
    )


def hooks_row(name: str, work: Path) -> str:
    driver = load_driver(name)
    reference = driver.fit(driver.new_run(seed=0), None, epochs=3, record_hooks=True)
    backup = work / "hooks-backup"
    driver.fit(driver.new_run(seed=0), backup, epochs=3, save_freq=4, interrupt=(1, 6), record_hooks=True)
    resumed = driver.fit(driver.new_run(seed=1), backup, epochs=3, save_freq=4, record_hooks=True)
    expected = from_backup_on(reference.hooks, 1, 4, driver.begins_a_resumed_epoch)
    first_batch = next(call for call in resumed.hooks if call[0] == "batch_begin")
    return (
        f"| {name} | {len(resumed.hooks)} | {len(expected)} | {first_batch[1:]} "
        f"| {'yes' if resumed.hooks == expected else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", nargs="+", default=sorted(DRIVERS), choices=sorted(DRIVERS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows, hook_rows = [], []
    for name in args.adapters:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(callback_state_row(name, Path(tmp)))
            hook_rows.append(hooks_row(name, Path(tmp)))
    print(
        "| adapter | uninterrupted: stops after epoch | LR | best score | interrupted+resumed: stops after "
        "epoch | LR | best score | best file equal | final weights equal |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print()
    print(
        "| adapter | hook calls after the resume | expected (uninterrupted, from the backup on) "
        "| first batch hook (epoch, batch, step) | identical |"
    )
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(hook_rows))


if __name__ == "__main__":
    main()
