"""``python -m specdec``: the ``specdec`` command (specdec/cli.py)."""

import sys

from specdec.cli import main

sys.exit(main())
