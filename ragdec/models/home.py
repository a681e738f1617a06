"""Where ragdec keeps its files: the one place that says so.

Prepared models live under ``ragdec_home() / "models"``, measured cost curves under
``costs/``, FREE's exit adapters under ``free/``; ``$RAGDEC_HOME`` moves all of them.
"""

from __future__ import annotations

import os
from pathlib import Path


def ragdec_home() -> Path:
    """``$RAGDEC_HOME``, or ``~/.cache/ragdec``."""
    return Path(os.environ.get("RAGDEC_HOME") or Path.home() / ".cache" / "ragdec").expanduser()
