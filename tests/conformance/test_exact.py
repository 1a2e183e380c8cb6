"""Exact resume: an interrupted run ends bit-identical to the same run uninterrupted.

Each scenario trains one reference run without interruption, then the same configuration
interrupted one or more times (each restart is a new model built with another seed, as a
restarted job with unseeded state would be: the restore must override weights and every RNG),
and compares weights, optimizer slots, the optimizer's step counter and the per-epoch losses
value for value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.harness import Worker
from unified_backup import Slot

EPOCHS = 5
ONE = [(1, 3)]
THREE = [(1, 3), (2, 6), (3, 1)]


def assert_identical(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_array_equal(a, e, err_msg=f"{what}[{i}] differs")


def run_exact(driver, tmp_path, interrupts, save_freq, **options):
    reference = driver.new_run(seed=0, **options)
    ref = driver.fit(reference, tmp_path / "reference", epochs=EPOCHS, save_freq=save_freq)
    assert ref.error is None and sorted(ref.losses) == list(range(EPOCHS))

    backup_dir = tmp_path / "backup"
    losses: dict[int, float] = {}
    for k, point in enumerate([*interrupts, None]):
        run = driver.new_run(seed=k, **options)
        result = driver.fit(run, backup_dir, epochs=EPOCHS, save_freq=save_freq, interrupt=point)
        losses.update(result.losses)
        if point is None:
            assert result.error is None, repr(result.error)
        else:
            assert isinstance(result.error, RuntimeError) and "interrupt" in str(result.error)
            assert Slot(backup_dir).read_manifest() is not None

    assert result.global_step == ref.global_step
    assert_identical(driver.weights(run), driver.weights(reference), "weights")
    assert_identical(driver.optimizer_state(run), driver.optimizer_state(reference), "optimizer state")
    assert losses == ref.losses  # the loss history, value for value
    assert not backup_dir.exists()


@pytest.mark.parametrize("interrupts", [ONE, THREE], ids=["one", "three"])
@pytest.mark.parametrize("save_freq", ["epoch", 5], ids=["per-epoch", "every-5-steps"])
def test_shuffled_input_and_dropout(driver, tmp_path, save_freq, interrupts):
    run_exact(driver, tmp_path, interrupts, save_freq, shuffle=True, dropout=0.2)


def test_learning_rate_schedule(driver, tmp_path):
    run_exact(driver, tmp_path, THREE, 5, lr_schedule=True, shuffle=True)


def test_steps_per_execution_or_gradient_accumulation(driver, tmp_path):
    run_exact(driver, tmp_path, THREE, 5, accumulate=2, shuffle=True, dropout=0.2)


def test_sigkill_at_step_granularity_with_shuffle_and_dropout(driver, tmp_path):
    def command(backup_dir, out, batch_sleep):
        return driver.demo_command(
            backup_dir, out, epochs=4, batch_sleep=batch_sleep, save_freq=5, exact=True
        )

    assert Worker(command(tmp_path / "reference", tmp_path / "reference.json", 0.0)).finish(300) == 0
    backup_dir = tmp_path / "backup"
    for _ in range(2):  # two SIGKILLs, each once a new step backup has been committed
        victim = Worker(command(backup_dir, tmp_path / "out.json", 0.05))
        assert victim.wait_event("start", 300) is not None, victim.failure()
        before = Slot(backup_dir).read_manifest()
        while victim.proc.poll() is None and Slot(backup_dir).read_manifest() in (None, before):
            victim.wait_event("never", 0.05)
        victim.wait_event("never", 0.12)  # land between backups, inside a step
        victim.kill()
        manifest = Slot(backup_dir).read_manifest()
        assert manifest is not None and manifest != before
    survivor = Worker(command(backup_dir, tmp_path / "out.json", 0.0))
    assert survivor.finish(300) == 0, survivor.failure()
    assert survivor.wait_event("start", 0)["restored_epoch"] == manifest.epoch
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
