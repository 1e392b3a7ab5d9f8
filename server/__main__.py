"""``python -m server ...`` is the ``mpo`` command."""

import sys

from .cli import main

sys.exit(main())
