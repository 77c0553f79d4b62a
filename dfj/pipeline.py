"""`dfj export --quant <method>` for a quantized format: the export stage, then the quantization stage,
composed here above both so that neither `dfj.export` nor `dfj.quant` imports the other.

The lossless format a method reads is exported into a scratch folder beside `out`, quantized into
`out`, and removed: the same artifact as `dfj export` followed by `dfj quant`, its chain of stages in
`dfj.json`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from dfj.export import FORMATS, export
from dfj.quant import METHODS, quantize

# The lossless format each quantization family starts from. GGUF: f16, as llama.cpp's own workflow
# (convert to f16, then quantize); ONNX: fp32; GPTQ: the float32 merge.
SHORTCUT_INPUT = {"gguf": ("gguf-f16", {}), "onnx": ("onnx-fp32", {}), "gptq": ("none", {"dtype": "float32"})}
# Options that belong to the quantization stage, not the export.
QUANT_OPTIONS = ("calibration", "samples", "group_size")


def all_formats() -> list[str]:
    """Every `--quant` that `dfj export` takes: the lossless formats, then the quantization methods."""
    return [*FORMATS, *METHODS]


def build(source: str | os.PathLike, out: str | os.PathLike, quant: str = "none", *, overwrite: bool = False,
          **options: Any) -> Path:
    """Export `source` (model folder, adapter folder, artifact or hub id) to `out` in format `quant`, a
    lossless format or a quantization method (`all_formats()`)."""
    if quant not in METHODS:
        if quant not in FORMATS:
            raise ValueError(f"unknown --quant {quant!r}: available {', '.join(all_formats())}")
        unknown = [k for k in options if k in QUANT_OPTIONS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} apply to the gptq-* formats only, not {quant}")
        return export(source, out, quant, overwrite=overwrite, **options)
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
