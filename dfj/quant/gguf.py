"""GGUF k-quants and Q8_0 by llama.cpp's own quantizer (`llama_model_quantize`), from a gguf-f32 or
gguf-f16 artifact: the text GGUF is quantized, the mmproj (vision) GGUF is carried over as it is.

Parity is measured against the input through llama.cpp on the export probe (the same runtime on both
sides, so the difference is the quantization's alone); the input's own parity against transformers
stays in the chain.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from dfj.artifact.probe import compare_logits, gguf_probe_logits
from dfj.artifact.staging import staged_folder
from dfj.images import PixelLimits
from dfj.manifest import write_manifest
from dfj.quant import QuantSpec, quantized_manifest
from dfj.layout import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE
from dfj.version import package_version

# llama_ftype of each quantization (llama.h).
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def quantize_text(source: Path, target: Path, level: str) -> None:
    """llama.cpp's own quantizer (K-quant mixes need it; the gguf package only has the plain types)."""
    from dfj.runtime.llamacpp import quiet_llama

    llama_cpp = quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[level]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise RuntimeError(f"llama.cpp failed to quantize {source.name} to {level} (status {status})")


def quantize_gguf(source: Path, out: Path, spec: QuantSpec, manifest, *, overwrite: bool = False) -> Path:
    info: dict[str, Any] = dict(manifest.extra.get("gguf", {}))
    limits = PixelLimits(**manifest.pixels)
    with staged_folder(out, overwrite=overwrite) as work:
        quantize_text(source / GGUF_TEXT_FILE, work / GGUF_TEXT_FILE, spec.level)
        shutil.copyfile(source / GGUF_MMPROJ_FILE, work / GGUF_MMPROJ_FILE)
        for name in sorted(p.name for p in source.iterdir()):  # tokenizer / processor files, if any
            if name not in (GGUF_TEXT_FILE, GGUF_MMPROJ_FILE, "dfj.json") and (source / name).is_file():
                shutil.copyfile(source / name, work / name)
        reference = gguf_probe_logits(source, manifest.mode, limits, info.get("normalizer"))
        parity = compare_logits(reference, gguf_probe_logits(work, manifest.mode, limits, info.get("normalizer")))
        parity.update(reference=f"{manifest.quant} (input, llama.cpp)", tolerance=None)
        info.update(quant=spec.level, quantized_from=manifest.quant,
                    bytes={GGUF_TEXT_FILE: (work / GGUF_TEXT_FILE).stat().st_size, GGUF_MMPROJ_FILE: (work / GGUF_MMPROJ_FILE).stat().st_size},
                    quantizer=f"llama.cpp (llama-cpp-python {package_version('llama_cpp_python')})")
        write_manifest(work, quantized_manifest(manifest, source, "gguf", spec.method, parity, {"gguf": info}))
    return Path(out).resolve()
