import sys

from unified_backup.cli import main

sys.exit(main())
