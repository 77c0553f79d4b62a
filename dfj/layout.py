"""The files an artifact of each format holds: one table that exporters, quantizers and runtimes
read, so a name is written in one place (importable without any backend)."""

from __future__ import annotations

# GGUF: llama.cpp's text model and its vision projector (mmproj), as `llama-mtmd-cli -m … --mmproj …` takes them.
GGUF_TEXT_FILE = "model.gguf"
GGUF_MMPROJ_FILE = "mmproj.gguf"
# ONNX: the onnx-community / onnxruntime-genai split of Qwen2.5-VL into three graphs.
ONNX_GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
