"""Runtimes: each turns (image, chat text) into generated text and teacher-forced log-probabilities.

Prompts, parsing, images and data live in the shared modules; a runtime only runs the model. The
table maps a runtime name to "module:factory" and is resolved lazily, so `import dfj` pulls in no
backend library; this is the one place a backend is chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

from dfj.runtime.base import Runtime

RUNTIMES: dict[str, str] = {
    "torch": "dfj.runtime.torch:TorchRuntime",
    "onnx": "dfj.runtime.onnx:OnnxRuntime",
    "llamacpp": "dfj.runtime.llamacpp:LlamaCppRuntime",
}

# The runtime each artifact format needs by default (manifest `format`).
RUNTIME_FOR_FORMAT: dict[str, str] = {
    "safetensors": "torch",
    "onnx": "onnx",
    "gptq": "torch",  # transformers + GPTQModel kernels (pure torch on CPU)
    "gguf": "llamacpp",
}

INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install 'dfj[torch]'",
    "onnx": "pip install 'dfj[onnx]'",
    "llamacpp": "pip install 'dfj[gguf]' (llama-cpp-python builds from source: see README)",
}


def runtime_for(manifest: Any) -> str:
    """The runtime an artifact's format needs (a plain model or adapter folder: torch)."""
    return RUNTIME_FOR_FORMAT.get(manifest.format if manifest else "", "torch")


def runtime_class(name: str) -> type[Runtime]:
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: available {', '.join(sorted(RUNTIMES))}")
    module_name, attr = RUNTIMES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"the {name} runtime needs packages that are not installed ({exc.name}): {INSTALL_HINTS[name]}") from exc
    return getattr(module, attr)


def create(name: str, source: Any, device: str, dtype: str | None, **options: Any) -> Runtime:
    return runtime_class(name).load(source, device=device, dtype=dtype, **options)


__all__ = ["RUNTIMES", "RUNTIME_FOR_FORMAT", "Runtime", "create", "runtime_class", "runtime_for"]
