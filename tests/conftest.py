"""The quick tier: ``python -m pytest -m quick`` runs, in a few minutes, every contract point that one
process can show (not point 8, distributed runs: ``-m multiprocess``).

It is the core's unit tests, the documents' checks and the conformance suite for every adapter,
less the scenarios that repeat a point through another real process (a second signal, a SIGKILL
at step granularity: ``tests/conformance/test_contract.py`` already kills a real process).
The full suite, what CI runs, is ``python -m pytest``.
"""

from __future__ import annotations

import os

import pytest

# gcsfs asks GCS's gRPC storage-layout API whether a bucket is zonal before its first request; the GCS
# emulator of tests/remote has no gRPC API, and every request then waits for its timeouts (real GCS
# answers at once). Read when gcsfs is imported, so set before any test imports it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

QUICK_PATHS = ("tests/core/", "tests/conformance/", "tests/test_docs.py", "tests/test_demo.py")
REPEATS = (  # node ids containing these stay in the full suite only
    "test_sigkill_at_step_granularity_with_shuffle_and_dropout",
    "-SIGUSR1]",
    "-save_freq=False]",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        quick = item.nodeid.startswith(QUICK_PATHS) and not any(r in item.nodeid for r in REPEATS)
        if quick and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(autouse=True)
def _not_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler's restart counter inherited from the job running the tests would make every fresh
    run look like a restart (a warning, or an error with resume="required"): the tests set their own."""
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
