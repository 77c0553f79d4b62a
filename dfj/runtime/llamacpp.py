"""The llama.cpp backend: a dfj GGUF artifact (text GGUF + mmproj) through llama-cpp-python.

The chat is the one `dfj.prompts` renders for every runtime. mtmd tokenizes the template's head,
whose image block becomes its media marker, encodes the image and places its embeddings with
Qwen2.5-VL's M-RoPE positions; the user's prompt follows as plain text (parse_special off: no control
tokens from a response). The text runs through llama.cpp's own tokenizer and decoder (low-level API:
no `Llama` object, whose per-position score buffer would cost n_ctx x vocab floats). The image arrives
already at its model size (`dfj.images.fit_to_grid`), and the mtmd token limits are the judge's pixel
limits, so mtmd copies it without resampling.

One KV sequence is kept between calls: a prompt that starts with the tokens already evaluated for
the same image (the records of one image and label) only runs what follows them. Image embeddings
are cached by image content, so records that come back to an earlier image skip the vision encoder.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dfj import prompts
from dfj.images import PixelLimits, fit_to_grid
from dfj.runtime.base import Runtime

TEXT_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PATCH_AREA = 28 * 28  # pixels per image token (patch 14, merge 2)
DEFAULT_CONTEXT = 8192
BATCH = 512
GGML_TYPE_F32 = 0
VISION_ENTRIES = 16

_LOG_SINK = None


def quiet_llama():
    """Import llama_cpp with its C-level logging silenced (it prints every tensor it loads)."""
    global _LOG_SINK
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_helper_log_set(_LOG_SINK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
    return llama_cpp


@dataclass
class _KvState:
    """What the single KV sequence holds: head ids, the image, then `tokens` from position `image_end`."""

    image_key: str
    head: list[int]
    image_end: int
    tokens: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Prompt:
    """A chat split at its image: text ids before, the mtmd image chunk, text ids after."""

    head: list[int]
    tail: list[int]
    image_tokens: int
    image_positions: int
    image_key: str
    chunks: Any  # mtmd_input_chunks (owns the image chunk)
    image_chunk: Any


class LlamaCppRuntime(Runtime):
    name = "llamacpp"

    def __init__(self, folder: Path, limits: PixelLimits, device: str = "cpu", context: int = DEFAULT_CONTEXT,
                 threads: int | None = None, normalizer: str | None = "manifest") -> None:
        llama_cpp = quiet_llama()
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd = llama_cpp, mtmd_cpp
        self.folder, self.limits, self.device = folder, limits, device
        threads = threads or os.cpu_count() or 1
        gpu = device.startswith("cuda")
        if gpu and not llama_cpp.llama_supports_gpu_offload():
            raise RuntimeError("device='cuda' needs llama-cpp-python built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on)")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu else 0
        self.model = llama_cpp.llama_model_load_from_file(str(folder / TEXT_FILE).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {folder / TEXT_FILE}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        trained = llama_cpp.llama_model_n_ctx_train(self.model)
        self.context_length = min(context, trained) if trained > 0 else context
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_length
        params.n_batch = params.n_ubatch = BATCH
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        exact = llama_cpp.llama_model_ftype(self.model) == 0
        if exact:  # an all-f32 model keeps f32 attention (flash attention on CPU rounds K/V to f16)
            params.type_k = params.type_v = GGML_TYPE_F32
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {self.context_length} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        mtmd_params = mtmd_cpp.mtmd_context_params_default()
        mtmd_params.use_gpu = gpu
        mtmd_params.n_threads = threads
        mtmd_params.print_timings = False
        mtmd_params.warmup = False
        if exact:
            mtmd_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # The judge's pixel limits as token limits: an image fitted to them is taken as it is.
        mtmd_params.image_min_tokens = max(1, limits.min_pixels // PATCH_AREA)
        mtmd_params.image_max_tokens = limits.max_pixels // PATCH_AREA
        self.marker = mtmd_cpp.mtmd_default_marker()
        mtmd_params.media_marker = self.marker
        self.vision = mtmd_cpp.mtmd_init_from_file(str(folder / MMPROJ_FILE).encode(), self.model, mtmd_params)
        if not self.vision:
            raise RuntimeError(f"llama.cpp (mtmd) could not load {folder / MMPROJ_FILE}")
        self.normalizer = _normalizer(folder) if normalizer == "manifest" else normalizer
        self.stop_ids = {self.tokenize(t)[0] for t in STOP_TOKENS}
        self.image_pad_id = self.tokenize("<|image_pad|>")[0]
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self._state: _KvState | None = None
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # image key -> mmproj output
        # Seconds per stage (for dfj.bench.speed): image encoding, prompt prefill, decoding.
        self.seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        self.stats = {"vision_hits": 0, "vision_misses": 0, "prefix_hits": 0, "prefix_misses": 0}

    @classmethod
    def load(cls, source: Any, device: str = "cpu", dtype: str | None = None, **options: Any) -> "LlamaCppRuntime":
        if dtype not in (None, "float32", "fp32", "auto"):
            raise ValueError(f"a GGUF artifact runs in the precision it was exported with; dtype={dtype!r} is not available")
        folder = Path(source.path)
        if not (folder / TEXT_FILE).is_file() or not (folder / MMPROJ_FILE).is_file():
            raise ValueError(f"{source.name} is not a dfj GGUF artifact ({TEXT_FILE} + {MMPROJ_FILE}); "
                             "export one with --quant gguf-f16")
        return cls(folder, options.get("limits") or source.limits, device=device,
                   context=options.get("context") or DEFAULT_CONTEXT, threads=options.get("threads"))

    @classmethod
    def from_folder(cls, folder: Path, limits: PixelLimits | None = None, device: str = "cpu",
                    normalizer: str | None = "manifest", context: int = DEFAULT_CONTEXT) -> "LlamaCppRuntime":
        return cls(Path(folder), limits or PixelLimits(), device=device, normalizer=normalizer, context=context)

    def close(self) -> None:
        """Free the native objects now (they are also freed when the runtime is collected)."""
        if getattr(self, "vision", None):
            self.mtmd.mtmd_free(self.vision)
            self.vision = None
        if getattr(self, "batch", None) is not None:
            self.llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    # -- text ------------------------------------------------------------------------------------
    def _normalized(self, text: str) -> str:
        return unicodedata.normalize(self.normalizer, text) if self.normalizer else text

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text, parse_special=True)

    def tokenize_plain(self, text: str) -> list[int]:
        return self._tokenize(text, parse_special=False)

    def _tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = self._normalized(text).encode("utf-8")
        size = len(data) + 8
        while True:
            out = (self.llama_cpp.llama_token * size)()
            n = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), out, size, False, parse_special)
            if n >= 0:
                return list(out[:n])
            size = -n

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        tokens = (self.llama_cpp.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        while True:
            out = ctypes.create_string_buffer(size)
            n = self.llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), out, size, True, False)
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            size = -n

    # -- prompt ----------------------------------------------------------------------------------
    def _prompt(self, image: Image.Image, chat: str) -> _Prompt:
        # mtmd tokenizes only the template's head (its image block becomes the image chunk); the
        # user's prompt follows as plain text, so a response cannot add control tokens or images.
        head_text, prompt_text, rest_text = prompts.split_chat(chat)
        if not head_text.endswith(IMAGE_BLOCK) or head_text.count(IMAGE_BLOCK) != 1:
            raise ValueError(f"the chat template's head must end with its one image block {IMAGE_BLOCK!r}")
        image = fit_to_grid(image, self.limits)
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        image_key = hashlib.sha256(rgb.tobytes()).hexdigest() + f":{image.width}x{image.height}"
        bitmap = self.mtmd.mtmd_bitmap_init(image.width, image.height,
                                            rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = self.mtmd.mtmd_input_chunks_init()
        try:
            text = self.mtmd.mtmd_input_text()
            data = self._normalized(head_text.replace(IMAGE_BLOCK, self.marker.decode())).encode("utf-8")
            text.text, text.text_len, text.add_special, text.parse_special = data, len(data), False, True
            bitmaps = (self.mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = self.mtmd.mtmd_tokenize(self.vision, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise RuntimeError(f"mtmd could not tokenize the prompt (status {status})")
            head: list[int] = []
            tail: list[int] = []
            image_chunk = None
            for index in range(self.mtmd.mtmd_input_chunks_size(chunks)):
                chunk = self.mtmd.mtmd_input_chunks_get(chunks, index)
                if self.mtmd.mtmd_input_chunk_get_type(chunk) == self.mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    pointer = self.mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    (tail if image_chunk is not None else head).extend(pointer[i] for i in range(count.value))
                elif image_chunk is None:
                    image_chunk = chunk
                else:
                    raise RuntimeError("mtmd made more than one image chunk")
            if image_chunk is None:
                raise RuntimeError("mtmd made no image chunk")
            tail.extend(self.tokenize_plain(prompt_text) + self.tokenize(rest_text))
        except BaseException:
            self.mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            self.mtmd.mtmd_bitmap_free(bitmap)
        return _Prompt(head, tail, self.mtmd.mtmd_input_chunk_get_n_tokens(image_chunk),
                       self.mtmd.mtmd_input_chunk_get_n_pos(image_chunk), image_key, chunks, image_chunk)

    def prompt_ids(self, image: Image.Image, chat: str) -> list[int]:
        """The prompt as one id list, each image token shown as `<|image_pad|>` (as transformers' processor)."""
        pad = self.image_pad_id
        return self._with_prompt(image, chat, lambda p: p.head + [pad] * p.image_tokens + p.tail)

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """(image tokens, hidden) embeddings of the mmproj for `image` (after the shared resize)."""
        return self._with_prompt(image, prompts.render_chat(""), lambda prompt: self._encode(prompt).copy())

    def _encode(self, prompt: _Prompt) -> np.ndarray:
        """The mmproj output for the prompt's image, from the cache when this image was seen."""
        cached = self._embeddings.get(prompt.image_key)
        if cached is not None:
            self._embeddings.move_to_end(prompt.image_key)
            self.stats["vision_hits"] += 1
            return cached
        self.stats["vision_misses"] += 1
        started = time.perf_counter()
        if self.mtmd.mtmd_encode_chunk(self.vision, prompt.image_chunk) != 0:
            raise RuntimeError("mtmd could not encode the image")
        width = self.llama_cpp.llama_model_n_embd_inp(self.model)
        pointer = self.mtmd.mtmd_get_output_embd(self.vision)
        embeddings = np.ctypeslib.as_array(pointer, shape=(prompt.image_tokens, width)).copy()
        self.seconds["vision"] += time.perf_counter() - started
        self._embeddings[prompt.image_key] = embeddings
        while len(self._embeddings) > VISION_ENTRIES:
            self._embeddings.popitem(last=False)
        return embeddings

    def _run_prompt(self, prompt: _Prompt, extra: list[int], outputs: list[int]) -> tuple[np.ndarray, int]:
        """Evaluate head, image, tail + `extra`; logits at `outputs` (indices into tail + extra).

        The KV state of the previous call is reused when it had the same image and head: the tokens
        after the image that both calls share are not run again (the other records of one image and
        label share all but their response)."""
        tokens = prompt.tail + extra
        state, self._state = self._state, None
        if state and state.image_key == prompt.image_key and state.head == prompt.head:
            base = state.image_end
            reuse = min(_common_prefix(state.tokens, tokens), min(outputs, default=len(tokens) - 1), len(tokens) - 1)
            self.llama_cpp.llama_memory_seq_rm(self.memory, 0, base + reuse, -1)
            self.stats["prefix_hits"] += 1
        else:
            embeddings = self._encode(prompt)
            self.stats["prefix_misses"] += 1
            started = time.perf_counter()
            self.llama_cpp.llama_memory_clear(self.memory, True)
            self._decode(prompt.head, 0, [])
            end = self.llama_cpp.llama_pos(0)
            no_callback = self.mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer
            status = self.mtmd.mtmd_helper_decode_image_chunk(
                self.vision, self.ctx, prompt.image_chunk, embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                len(prompt.head), 0, BATCH, ctypes.byref(end), no_callback, None)
            if status != 0:
                raise RuntimeError(f"llama.cpp could not evaluate the image (status {status})")
            base, reuse = end.value, 0
            self.seconds["prefill"] += time.perf_counter() - started
        started = time.perf_counter()
        logits = self._decode(tokens[reuse:], base + reuse, [i - reuse for i in outputs])
        self.seconds["prefill"] += time.perf_counter() - started
        self._state = _KvState(prompt.image_key, prompt.head, base, list(tokens))
        return logits, base + len(tokens)

    def _step(self, token: int, position: int) -> np.ndarray:
        """Decode one generated token after `_run_prompt`, keeping the KV state's token list true."""
        state, self._state = self._state, None
        started = time.perf_counter()
        logits = self._decode([token], position, [0])
        self.seconds["decode"] += time.perf_counter() - started
        if state is not None:
            state.tokens.append(token)
            self._state = state
        return logits

    def _decode(self, tokens: list[int], start: int, outputs: list[int]) -> np.ndarray:
        """Decode `tokens` at positions start.. in batches; (len(outputs), vocab) logits at those indices."""
        wanted = set(outputs)
        rows: dict[int, np.ndarray] = {}
        batch = self.batch
        for offset in range(0, len(tokens), BATCH):
            part = tokens[offset:offset + BATCH]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = start + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = (offset + i) in wanted
            status = self.llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama.cpp decode failed (status {status}; context {self.context_length} tokens)")
            for i in range(len(part)):
                if (offset + i) in wanted:
                    pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, i)
                    rows[offset + i] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        return np.stack([rows[i] for i in outputs]) if outputs else np.zeros((0, self.n_vocab), dtype=np.float32)

    def _with_prompt(self, image: Image.Image, chat: str, work):
        prompt = self._prompt(image, chat)
        try:
            needed = len(prompt.head) + prompt.image_positions + len(prompt.tail)
            if needed > self.context_length:
                raise ValueError(f"prompt needs {needed} positions; the context holds {self.context_length}")
            return work(prompt)
        finally:
            self.mtmd.mtmd_input_chunks_free(prompt.chunks)

    def prompt_logits(self, image: Image.Image, chat: str, positions: int = 24) -> np.ndarray:
        """Logits at the last `positions` positions of `chat` (the export parity probe)."""
        def work(prompt: _Prompt) -> np.ndarray:
            if positions > len(prompt.tail):
                raise ValueError(f"only {len(prompt.tail)} text positions follow the image")
            return self._run_prompt(prompt, [], list(range(len(prompt.tail) - positions, len(prompt.tail))))[0]
        return self._with_prompt(image, chat, work)

    # -- work ------------------------------------------------------------------------------------
    def generate_ids(self, image: Image.Image, chat: str, max_new_tokens: int) -> list[int]:
        return self.generate_ids_cached(image, chat, max_new_tokens, None)

    def generate_ids_cached(self, image, chat, max_new_tokens, prefix_chars, stop=None) -> list[int]:
        def work(prompt: _Prompt) -> list[int]:
            logits, position = self._run_prompt(prompt, [], [len(prompt.tail) - 1])
            generated: list[int] = []
            while True:
                token = int(np.argmax(logits[-1]))
                if token in self.stop_ids:
                    break
                generated.append(token)
                if len(generated) >= max_new_tokens or (stop and self.decode(generated).endswith(stop)):
                    break
                if position >= self.context_length:
                    raise ValueError(f"generation ran past the context of {self.context_length} tokens")
                logits = self._step(token, position)
                position += 1
            return generated
        return self._with_prompt(image, chat, work)

    def logprobs_ids(self, image: Image.Image, chat: str, ids: list[int]) -> np.ndarray:
        from scipy.special import log_softmax

        def work(prompt: _Prompt) -> np.ndarray:
            first = len(prompt.tail) - 1
            logits, _ = self._run_prompt(prompt, list(ids), list(range(first, first + len(ids))))
            return log_softmax(logits.astype(np.float64), axis=-1).astype(np.float32)
        return self._with_prompt(image, chat, work)

    def logprobs_ids_cached(self, image, chat, ids, prefix_chars) -> np.ndarray:
        return self.logprobs_ids(image, chat, ids)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": self.device, "context": self.context_length,
                "llama_cpp_python": package_version("llama_cpp_python")}


def _normalizer(folder: Path) -> str | None:
    """The Unicode normalisation the source tokenizer applied (recorded at export; Qwen2.5: NFC)."""
    from dfj.manifest import read_manifest

    manifest = read_manifest(folder)
    return (manifest.extra.get("gguf", {}) if manifest else {}).get("normalizer", "NFC")


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
