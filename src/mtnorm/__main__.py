"""``python -m mtnorm`` (and ``torchrun -m mtnorm``) runs the ``mtnorm`` command."""

import sys

from mtnorm.cli import main

sys.exit(main())
