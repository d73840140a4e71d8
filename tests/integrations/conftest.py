"""Integration tests against the real model libraries (torchvision, timm, transformers).

They run in their own environment (`make test` builds `.venv-int` with the `integrations` extra;
torchvision's wheels need the registry's torch build, not the CPU wheel of `.venv`) and are
collected only when MTNORM_INTEGRATION=1, which the Makefile sets. There a missing library is an
import error, i.e. a failure, never a skip.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("MTNORM_INTEGRATION") == "1" else ["test_*.py"]
