import subprocess
import sys
from pathlib import Path

import unified_backup
from unified_backup import errors

FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "torch", "lightning", "pytorch_lightning")


def test_core_imports_no_framework():
    code = (
        "import sys, unified_backup, unified_backup.cli, unified_backup.demo, unified_backup.lifecycle\n"
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the core imported {out.stdout.strip()}"


def test_all_is_complete():
    package = Path(unified_backup.__file__).parent
    modules = {p.stem for p in package.glob("*.py")}
    public = {name for name in dir(unified_backup) if not name.startswith("_")}
    assert public - modules - set(unified_backup.__all__) == set()


def test_every_error_derives_from_backup_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.BackupError)
