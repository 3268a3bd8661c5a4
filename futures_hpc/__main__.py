"""``python -m futures_hpc``: the ``futures-hpc`` command."""

import sys

from .cli import main

sys.exit(main())
