"""Exporters: turn a judge source into a standalone artifact folder with a dfj manifest.

`FORMATS` maps each lossless format to its exporter ("module:function", fixed options), resolved
lazily so a missing optional backend only matters when that format is asked for. A quantized format
(`dfj.quant.METHODS`) is the shortcut `export` then `quantize`: the lossless format its method reads
is exported into a scratch folder beside `out`, quantized into `out`, and removed.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, get_args

from dfj.export.spec import ExportFormat, ExportSpec

FORMATS: dict[ExportFormat, tuple[str, dict[str, Any]]] = {
    "none": ("dfj.export.lora_merge:export_merged", {}),
    "onnx-fp32": ("dfj.export.onnx:export_onnx", {"quant": "fp32"}),
    "gguf-f32": ("dfj.export.gguf:export_gguf", {"quant": "f32"}),
    "gguf-f16": ("dfj.export.gguf:export_gguf", {"quant": "f16"}),
}
# The lossless format each quantization family starts from when `export` runs both stages. GGUF:
# f16, as llama.cpp's own workflow (convert to f16, then quantize); GPTQ: the float32 merge.
SHORTCUT_INPUT = {"gguf": ("gguf-f16", {}), "onnx": ("onnx-fp32", {}), "gptq": ("none", {"dtype": "float32"})}
# Options that belong to the quantization stage, not the export.
QUANT_OPTIONS = ("calibration", "samples", "group_size")


assert tuple(FORMATS) == get_args(ExportFormat)


def all_formats() -> list[str]:
    from dfj.quant import METHODS

    return [*FORMATS, *METHODS]


def export(source: str | os.PathLike, out: str | os.PathLike, quant: str = "none", *, overwrite: bool = False,
           **options: Any) -> Path:
    """Export `source` (model folder, adapter folder, artifact or hub id) to `out` in format `quant`."""
    from dfj.quant import METHODS, quantize

    if quant in METHODS:
        family = quant.split("-")[0]
        lossless, fixed = SHORTCUT_INPUT[family]
        quant_options = {k: options.pop(k) for k in QUANT_OPTIONS if k in options}
        if family == "gptq" and quant_options.get("calibration") is None:
            from dfj.quant.gptq import NO_CALIBRATION

            raise ValueError(NO_CALIBRATION)  # before minutes of merging
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export-") as scratch:
            intermediate = export(source, Path(scratch) / lossless, lossless, **{**options, **fixed})
            return quantize(intermediate, out, quant, overwrite=overwrite, **quant_options)
    if quant not in FORMATS:
        raise ValueError(f"unknown --quant {quant!r}: available {', '.join(all_formats())}")
    unknown = [k for k in options if k in QUANT_OPTIONS]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} apply to the gptq-* formats only, not {quant}")
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


__all__ = ["FORMATS", "ExportFormat", "ExportSpec", "all_formats", "export", "merge"]
