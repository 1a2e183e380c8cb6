"""Print the table of bad backups: for each case and adapter, the error raised and whether it held.

    python benchmarks/bad_inputs.py      (from the repository root; about 30 s)

A row says ``ok`` only when the error is the expected one, names the damaged file or variable,
and the refused resume changed neither the weights nor any file of the backup.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conformance.bad_inputs import CASES, NEEDS_OTHER  # noqa: E402
from tests.conformance.conftest import DRIVERS, load_driver  # noqa: E402


def main() -> int:
    logging.disable(logging.WARNING)
    drivers = {name: load_driver(name) for name in sorted(DRIVERS)}
    print(f"| case | {' | '.join(drivers)} |\n|---|{'---|' * len(drivers)}")
    failed = False
    for case, run in CASES.items():
        cells = []
        for name, driver in drivers.items():
            other = [d for n, d in drivers.items() if n != name]
            with tempfile.TemporaryDirectory() as tmp:
                outcome = run(driver, Path(tmp) / "backup", *(other if case in NEEDS_OTHER else []))
            first_line = str(outcome.error).splitlines()[0].replace(tmp, "") if outcome.error else ""
            verdict = "ok" if outcome.ok else "FAILED"
            failed |= not outcome.ok
            cells.append(f"{verdict}: `{type(outcome.error).__name__}` {first_line[:80]}")
        print(f"| {case} | {' | '.join(cells)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
