"""``python -m cliploom``: the same as the ``cliploom`` command."""

import sys

from .cli import main

sys.exit(main())
