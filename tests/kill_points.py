"""The environment that makes a dfj command kill itself at a named point of its work (`hooks/sitecustomize.py`)."""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).parent / "hooks"


def kill_env(point: str) -> dict[str, str]:
    """os.environ, plus what makes a child Python stop dead at `point` (see hooks/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "DFJ_TEST_KILL_AT": point}
