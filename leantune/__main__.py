"""``python -m leantune``: the same as the ``leantune`` command."""

import sys

from leantune.cli import main

sys.exit(main())
