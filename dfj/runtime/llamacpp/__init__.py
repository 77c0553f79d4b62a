"""The llama.cpp backend: a dfj GGUF artifact (text GGUF + mmproj) through llama-cpp-python.

- `library`: llama-cpp-python loaded once per process, its C logging silenced.
- `context`: the text model's llama.cpp context: KV sequences and batched decoding.
- `images`: mtmd: a prompt's image block as an image chunk, its encoding (cached by pixels), placed
  in a context with Qwen2.5-VL's M-RoPE positions.
- `runtime`: `LlamaCppRuntime`, the runtime contract on the two, group by group (`base.by_group`).
"""

from dfj.runtime.llamacpp.library import quiet_llama
from dfj.runtime.llamacpp.runtime import DEFAULT_CONTEXT, LlamaCppRuntime

__all__ = ["DEFAULT_CONTEXT", "LlamaCppRuntime", "quiet_llama"]
