"""Exporters: turn a judge source into a standalone artifact folder with a dfj manifest.

`FORMATS` maps each `--quant` name to "module:function"; it is resolved lazily so a missing optional
backend only matters when that format is asked for.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

FORMATS: dict[str, str] = {
    "none": "dfj.export.lora_merge:export_merged",
}


def export(source: str | os.PathLike, out: str | os.PathLike, quant: str = "none", **options: Any) -> Path:
    """Export `source` (model folder, adapter folder, artifact or hub id) to `out` in format `quant`."""
    if quant not in FORMATS:
        raise ValueError(f"unknown --quant {quant!r}: available {', '.join(FORMATS)}")
    module_name, attr = FORMATS[quant].split(":")
    function = getattr(importlib.import_module(module_name), attr)
    return function(source, out, **options)


def merge(source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Path:
    """base + LoRA adapter -> standalone safetensors judge (`dfj export --quant none`)."""
    return export(source, out, "none", **options)


__all__ = ["FORMATS", "export", "merge"]
