"""Exporters: turn a judge source into a standalone artifact folder with a dfj manifest.

`FORMATS` maps each lossless format to its exporter ("module:function", fixed options), resolved
lazily so a missing optional backend only matters when that format is asked for. Quantized formats
are a stage of their own (`dfj.quant`); `dfj.pipeline.build` runs both for `dfj export --quant <method>`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, get_args

from dfj.export.spec import ExportFormat, ExportSpec

FORMATS: dict[ExportFormat, tuple[str, dict[str, Any]]] = {
    "none": ("dfj.export.lora_merge:export_merged", {}),
    "onnx-fp32": ("dfj.export.onnx:export_onnx", {"quant": "fp32"}),
    "gguf-f32": ("dfj.export.gguf:export_gguf", {"quant": "f32"}),
    "gguf-f16": ("dfj.export.gguf:export_gguf", {"quant": "f16"}),
}
assert tuple(FORMATS) == get_args(ExportFormat)


def export(source: str | os.PathLike, out: str | os.PathLike, quant: ExportFormat = "none", *, overwrite: bool = False,
           **options: Any) -> Path:
    """Export `source` (model folder, adapter folder, artifact or hub id) to `out` in the lossless format
    `quant`. A quantized format is `dfj.pipeline.build` (export, then `dfj.quant.quantize`)."""
    if quant not in FORMATS:
        hint = "" if quant.split("-")[0] not in ("gguf", "onnx", "gptq") else (
            f"; {quant} is a quantization: dfj.pipeline.build(source, out, {quant!r}), or dfj.quant.quantize on an export")
        raise ValueError(f"unknown export format {quant!r}: available {', '.join(FORMATS)}{hint}")
    spec = ExportSpec.parse(quant, options)
    target, fixed = FORMATS[quant]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"--quant {quant} needs packages that are not installed ({exc.name}): pip install 'dfj[all]'") from exc
    return getattr(module, attr)(source, out, overwrite=overwrite, **spec.exporter_options(), **fixed)


def merge(source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Path:
    """base + LoRA adapter -> standalone safetensors judge (`dfj export --quant none`)."""
    return export(source, out, "none", **options)


__all__ = ["FORMATS", "ExportFormat", "ExportSpec", "export", "merge"]
