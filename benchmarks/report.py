"""How a benchmark reports: its result as strict JSON (no NaN: "nothing measured" is null), printed and
written where asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, out: Path | None) -> str:
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
    return text
