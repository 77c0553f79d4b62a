"""Exporters: turn a judge source into a standalone artifact folder with a dfj manifest.

`FORMATS` maps each `--quant` name to ("module:function", fixed options); it is resolved lazily so a
missing optional backend only matters when that format is asked for.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("dfj.export.lora_merge:export_merged", {}),
    "onnx-fp32": ("dfj.export.onnx:export_onnx", {"quant": "fp32"}),
    "onnx-int8": ("dfj.export.onnx:export_onnx", {"quant": "int8"}),
    "onnx-int4": ("dfj.export.onnx:export_onnx", {"quant": "int4"}),
    "gptq-4bit": ("dfj.export.gptq:export_gptq", {"bits": 4}),
    "gguf-f32": ("dfj.export.gguf:export_gguf", {"quant": "f32"}),
    "gguf-f16": ("dfj.export.gguf:export_gguf", {"quant": "f16"}),
    "gguf-q8_0": ("dfj.export.gguf:export_gguf", {"quant": "q8_0"}),
    "gguf-q4_k_m": ("dfj.export.gguf:export_gguf", {"quant": "q4_k_m"}),
}


def export(source: str | os.PathLike, out: str | os.PathLike, quant: str = "none", **options: Any) -> Path:
    """Export `source` (model folder, adapter folder, artifact or hub id) to `out` in format `quant`."""
    if quant not in FORMATS:
        raise ValueError(f"unknown --quant {quant!r}: available {', '.join(FORMATS)}")
    target, fixed = FORMATS[quant]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"--quant {quant} needs packages that are not installed ({exc.name}): pip install 'dfj[all]'") from exc
    return getattr(module, attr)(source, out, **{**options, **fixed})


def merge(source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Path:
    """base + LoRA adapter -> standalone safetensors judge (`dfj export --quant none`)."""
    return export(source, out, "none", **options)


__all__ = ["FORMATS", "export", "merge"]
