"""Quantization as its own stage: a dfj artifact in, a smaller dfj artifact out, with its parity against
the input recorded and the chain of stages (source -> export -> quant) kept in `dfj.json`.

Each method reads the one lossless format it needs, as its input's manifest says:

| method | input artifact (`dfj export --quant …`) | module |
|---|---|---|
| gguf-q8_0, gguf-q6_k, gguf-q5_k_m, gguf-q4_k_m | gguf-f32 or gguf-f16 | `dfj.quant.gguf` (llama.cpp's quantizer) |
| onnx-int8, onnx-int4 | onnx-fp32 | `dfj.quant.onnx` (onnxruntime's quantizers) |
| gptq-4bit, gptq-8bit | none (the merged safetensors judge) | `dfj.quant.gptq` (GPTQModel, DFJ calibration) |

Modules load lazily, so a missing optional backend only matters when its method is asked for.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Method = Literal["gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "onnx-int8", "onnx-int4", "gptq-4bit", "gptq-8bit"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class Family:
    module: str  # "module:function" taking (input, out, spec, manifest, overwrite)
    input_format: str
    input_quants: tuple[str, ...]
    extra: str  # the pip extra that installs its backend


FAMILIES = {
    "gguf": Family("dfj.quant.gguf:quantize_gguf", "gguf", ("gguf-f32", "gguf-f16"), "gguf"),
    "onnx": Family("dfj.quant.onnx:quantize_onnx", "onnx", ("onnx-fp32",), "onnx"),
    "gptq": Family("dfj.quant.gptq:quantize_gptq", "safetensors", ("none",), "gptq"),
}


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to, and the calibration the GPTQ methods need (the others take none)."""

    method: Method
    calibration: Path | None = None  # a DFJ split folder
    samples: int = 128
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}: available {', '.join(METHODS)}")
        if not self.method.startswith("gptq") and self.calibration is not None:
            raise ValueError(f"{self.method} takes no calibration (only the gptq-* methods are calibrated)")
        if self.samples < 1 or (self.group_size < 1 and self.group_size != -1):
            raise ValueError("samples must be >= 1 and group_size >= 1 (or -1 for one group per row)")

    @property
    def family(self) -> Family:
        return FAMILIES[self.method.split("-")[0]]

    @property
    def level(self) -> str:
        """The method's level within its family: q4_k_m, int8, 4bit..."""
        return self.method.split("-", 1)[1]


def input_hint(method: str) -> str:
    family = FAMILIES[method.split("-")[0]]
    made_by = " or ".join(f"dfj export SOURCE --quant {q}" for q in family.input_quants)
    return f"{method} quantizes a {' / '.join(family.input_quants)} artifact ({made_by})"


def quantize(source: str | os.PathLike, out: str | os.PathLike, method: str, *, calibration: str | os.PathLike | None = None,
             samples: int = 128, group_size: int = 128, overwrite: bool = False) -> Path:
    """Quantize the dfj artifact `source` with `method` into `out` (staged, renamed into place)."""
    from dfj.manifest import ArtifactError, read_manifest, verify

    spec = QuantSpec(method, Path(calibration) if calibration is not None else None, samples, group_size)  # type: ignore[arg-type]
    source = Path(source)
    manifest = read_manifest(source) if source.is_dir() else None
    if manifest is None:
        raise ArtifactError(f"{source}: not a dfj artifact (no dfj.json); {input_hint(method)}")
    verify(source, manifest)
    family = spec.family
    if manifest.format != family.input_format or manifest.quant not in family.input_quants:
        raise ValueError(f"{source} is a {manifest.quant} artifact, but {input_hint(method)}")
    module_name, attr = family.module.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{method} needs packages that are not installed ({exc.name}): pip install 'dfj[{family.extra}]'") from exc
    return getattr(module, attr)(source.resolve(), Path(out), spec, manifest, overwrite=overwrite)


def quantized_manifest(input_manifest, input_folder: Path, fmt: str, quant: str, parity: dict, extra: dict):
    """The output's manifest: the input's judge facts, this stage's parity and the chain extended."""
    from dfj.images import PixelLimits
    from dfj.manifest import MANIFEST_NAME, Manifest, sha256_file

    manifest = Manifest.for_judge(
        input_manifest.mode, fmt,
        {"name": str(input_folder), "kind": "artifact", "format": input_manifest.format, "quant": input_manifest.quant,
         "manifest_sha256": sha256_file(input_folder / MANIFEST_NAME), "origin": input_manifest.source},
        limits=PixelLimits(**input_manifest.pixels) if input_manifest.pixels else None,
        quant=quant, parity=parity, extra=extra)
    manifest.chain = [*(input_manifest.chain or [input_manifest.stage("export")]), manifest.stage("quant")]
    return manifest


__all__ = ["FAMILIES", "METHODS", "Method", "QuantSpec", "input_hint", "quantize"]
