"""``python -m pyvm``: the same as the ``pyvm`` command."""

import sys

from pyvm.cli import main

sys.exit(main())
