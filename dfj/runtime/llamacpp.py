"""The llama.cpp backend: a dfj GGUF artifact (text GGUF + mmproj) through llama-cpp-python.

Prompts arrive as token ids (made with this runtime's own tokenizer: the template's text with its
control tokens, the label and responses as plain text). Only the image block goes to mtmd, which
encodes the image and places its embeddings with Qwen2.5-VL's M-RoPE positions. The text runs through
llama.cpp's low-level API (no `Llama` object, whose per-position score buffer would cost n_ctx x vocab
floats). The image arrives already at its model size (`dfj.images.fit_to_grid`), and the mtmd token
limits are the judge's pixel limits, so mtmd copies it without resampling.

KV sequence 0 holds the head a group of prompts shares (same image and label: the chat up to the
first response) and is kept between calls, so the next group on that image and label runs only what
follows it. Each prompt of a group is a sequence of its own that starts as a copy of sequence 0 (the
cells are shared, not recomputed); the group's suffixes run in one decode batch, and greedy decoding
advances every unfinished sequence in each step. Image embeddings are cached by image content.
"""

from __future__ import annotations

import ctypes
import os
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dfj.images import PixelLimits, fit_to_grid
from dfj.runtime.base import Cancelled, Prompt, Runtime, Scores, Scoring, check_cancel, generation_done, image_block

TEXT_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PATCH_AREA = 28 * 28  # pixels per image token (patch 14, merge 2)
DEFAULT_CONTEXT = 8192
BATCH = 512
GGML_TYPE_F32 = 0
VISION_ENTRIES = 16
# Sequences decoded together (DFJ: 10 pairs or 5 responses per image); sequence 0 holds the shared head.
SEQUENCES = 10

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


class _NoRoom(RuntimeError):
    """The KV cache has no room for a whole group (it then runs one prompt at a time)."""


@dataclass
class _KvState:
    """What KV sequence 0 holds: head ids, the image, then `tokens` from position `image_end`."""

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
        # Sequence 0 holds a group's shared head, 1..SEQUENCES its prompts; one unified KV cache so that
        # every sequence may use the whole context and copies of the head share its cells.
        params.n_seq_max = SEQUENCES + 1
        params.kv_unified = True
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
        self.stop_ids = {self.tokenize(t, True)[0] for t in STOP_TOKENS}
        self.image_pad_id, self.vision_start_id, self.vision_end_id = (
            self.tokenize(t, True)[0] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self._state: _KvState | None = None
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # image key -> mmproj output
        # Seconds per stage (for dfj.bench.speed): image encoding, prompt prefill, decoding.
        self.seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        self.stats = {"vision_hits": 0, "vision_misses": 0, "prefix_hits": 0, "prefix_misses": 0}

    @classmethod
    def load(cls, source: Any, device: str = "cpu", dtype: str | None = None, **options: Any) -> "LlamaCppRuntime":
        """Options: `dfj.runtime.options.LlamaCppOptions` (`limits`, `context` positions (default 8,192),
        `threads`, `normalizer`: the source tokenizer's Unicode normalisation, default as the manifest records)."""
        from dfj.runtime.options import LlamaCppOptions

        opts = LlamaCppOptions.parse("llama.cpp", options)
        if dtype not in (None, "float32", "fp32", "auto"):
            raise ValueError(f"a GGUF artifact runs in the precision it was exported with; dtype={dtype!r} is not available")
        folder = Path(source.path)
        if not (folder / TEXT_FILE).is_file() or not (folder / MMPROJ_FILE).is_file():
            raise ValueError(f"{source.name} is not a dfj GGUF artifact ({TEXT_FILE} + {MMPROJ_FILE}); "
                             "export one with --quant gguf-f16")
        return cls(folder, opts.limits or source.limits, device=device, context=opts.context or DEFAULT_CONTEXT,
                   threads=opts.threads, normalizer=opts.normalizer)

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

    def tokenize(self, text: str, special: bool) -> list[int]:
        data = self._normalized(text).encode("utf-8")
        size = len(data) + 8
        while True:
            out = (self.llama_cpp.llama_token * size)()
            n = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), out, size, False, special)
            if n >= 0:
                return list(out[:n])
            size = -n

    def decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        ids = list(ids)
        tokens = (self.llama_cpp.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        while True:
            out = ctypes.create_string_buffer(size)
            n = self.llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), out, size, True, False)
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            size = -n

    # -- prompt ----------------------------------------------------------------------------------
    def _prompt(self, prepared: Prompt) -> _Prompt:
        """The prepared ids split at their image block; mtmd turns the block into its image chunk (its
        own `<|vision_start|>`/`<|vision_end|>` text around it). Only the block's marker is given to mtmd
        as text: every other id is the caller's, so a response cannot add control tokens or images."""
        ids = list(prepared.ids)
        at = image_block(ids, self.image_pad_id)
        if not (0 < at < len(ids) - 1 and ids[at - 1] == self.vision_start_id and ids[at + 1] == self.vision_end_id):
            raise ValueError(f"the image pad must sit in the image block {IMAGE_BLOCK!r}")
        image = fit_to_grid(prepared.image, self.limits)
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = self.mtmd.mtmd_bitmap_init(image.width, image.height,
                                            rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = self.mtmd.mtmd_input_chunks_init()
        try:
            text = self.mtmd.mtmd_input_text()
            data = self.marker
            text.text, text.text_len, text.add_special, text.parse_special = data, len(data), False, True
            bitmaps = (self.mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = self.mtmd.mtmd_tokenize(self.vision, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise RuntimeError(f"mtmd could not tokenize the image block (status {status})")
            before: list[int] = []
            after: list[int] = []
            image_chunk = None
            for index in range(self.mtmd.mtmd_input_chunks_size(chunks)):
                chunk = self.mtmd.mtmd_input_chunks_get(chunks, index)
                if self.mtmd.mtmd_input_chunk_get_type(chunk) == self.mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    pointer = self.mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    (after if image_chunk is not None else before).extend(pointer[i] for i in range(count.value))
                elif image_chunk is None:
                    image_chunk = chunk
                else:
                    raise RuntimeError("mtmd made more than one image chunk")
            if image_chunk is None:
                raise RuntimeError("mtmd made no image chunk")
            if before != [self.vision_start_id] or after != [self.vision_end_id]:
                raise RuntimeError(f"mtmd wraps the image as {before} ... {after}, not in the prompt's image block")
        except BaseException:
            self.mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            self.mtmd.mtmd_bitmap_free(bitmap)
        built = _Prompt(ids[:at], ids[at + 1:], self.mtmd.mtmd_input_chunk_get_n_tokens(image_chunk),
                        self.mtmd.mtmd_input_chunk_get_n_pos(image_chunk), prepared.image_key, chunks, image_chunk)
        needed = len(built.head) + built.image_positions + len(built.tail)
        if needed > self.context_length:
            self.mtmd.mtmd_input_chunks_free(chunks)
            raise ValueError(f"prompt needs {needed} positions; the context holds {self.context_length}")
        return built

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

    def embed_images(self, prompts: Sequence[Prompt]) -> list:
        from dfj.runtime.base import each

        def embed(prepared: Prompt) -> np.ndarray:
            prompt = self._prompt(prepared)
            try:
                return self._encode(prompt).copy()
            finally:
                self.mtmd.mtmd_input_chunks_free(prompt.chunks)

        return each(list(prompts), embed)

    # -- KV sequences ----------------------------------------------------------------------------------
    def _shared(self, prompt: _Prompt, common: list[int]) -> int:
        """Make sequence 0 hold the prompt's head, its image and `common` (the text all sequences of the
        group share); returns the position where the text after the image starts. Sequence 0 is kept
        between calls: what it already holds for this image and head is not run again."""
        state, self._state = self._state, None
        if state and state.image_key == prompt.image_key and state.head == prompt.head:
            base = state.image_end
            reuse = _common_prefix(state.tokens, common)
            self.llama_cpp.llama_memory_seq_rm(self.memory, 0, base + reuse, -1)
            self.stats["prefix_hits"] += 1
        else:
            embeddings = self._encode(prompt)
            self.stats["prefix_misses"] += 1
            started = time.perf_counter()
            self.llama_cpp.llama_memory_clear(self.memory, True)
            self._decode([(token, i, 0, False) for i, token in enumerate(prompt.head)])
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
        self._decode([(token, base + i, 0, False) for i, token in enumerate(common[reuse:], start=reuse)])
        self.seconds["prefill"] += time.perf_counter() - started
        self._state = _KvState(prompt.image_key, prompt.head, base, list(common))
        return base

    def _run_group(self, group: list[_Prompt], extras: list[list[int]], outputs: list[list[int]]) -> tuple[list[np.ndarray], int]:
        """Run the prompts of one group (same image and head) as sequences 1..n, each a copy of sequence
        0's shared KV (llama.cpp's sequence copy: the cells are shared, not recomputed) followed by its
        own tokens, all in one decode batch. Returns each prompt's logits at `outputs` (indices into its
        tail + extra) and the position where the text after the image starts."""
        tokens = [p.tail + e for p, e in zip(group, extras)]
        shared = min([_common_prefix(tokens[0], t) for t in tokens] + [min(o) for o in outputs])
        base = self._shared(group[0], tokens[0][:shared])
        entries = []
        for seq, (sequence, wanted) in enumerate(zip(tokens, outputs), start=1):
            self.llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.llama_cpp.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
            wanted_set = set(wanted)
            entries.extend((token, base + i, seq, i in wanted_set) for i, token in enumerate(sequence[shared:], start=shared))
        started = time.perf_counter()
        rows = self._decode(entries)
        self.seconds["prefill"] += time.perf_counter() - started
        return [np.stack([rows[(seq, base + i)] for i in wanted]) for seq, wanted in enumerate(outputs, start=1)], base

    def _release(self, count: int) -> None:
        for seq in range(1, count + 1):
            self.llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[tuple[int, int], np.ndarray]:
        """Decode (token, position, sequence, wants logits) entries in batches; logits by (sequence, position)."""
        rows: dict[tuple[int, int], np.ndarray] = {}
        batch = self.batch
        for offset in range(0, len(entries), BATCH):
            part = entries[offset:offset + BATCH]
            batch.n_tokens = len(part)
            for i, (token, position, seq, wanted) in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = wanted
            status = self.llama_cpp.llama_decode(self.ctx, batch)
            if status == 1:
                raise _NoRoom(f"no room in the KV cache of {self.context_length} positions for this group")
            if status != 0:
                raise RuntimeError(f"llama.cpp decode failed (status {status}; context {self.context_length} tokens)")
            for i, (_, position, seq, wanted) in enumerate(part):
                if wanted:
                    pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, i)
                    rows[(seq, position)] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        return rows

    # -- work ------------------------------------------------------------------------------------
    def _grouped(self, prepared: list[Prompt], work) -> list:
        """Build each prompt (a failure in its place), run groups of the same image and head together
        (at most SEQUENCES at once); a group that fails runs again one prompt at a time."""
        from dfj.runtime.base import groups_by_head

        results: list = [None] * len(prepared)
        built: dict[int, _Prompt] = {}
        try:
            for index, prompt in enumerate(prepared):
                try:
                    built[index] = self._prompt(prompt)
                except Exception as exc:  # noqa: BLE001 - this prompt's error, in its place
                    results[index] = exc
            for indices in groups_by_head(prepared):
                indices = [i for i in indices if i in built]
                for start in range(0, len(indices), SEQUENCES):
                    part = indices[start:start + SEQUENCES]
                    try:
                        outputs = work([built[i] for i in part], part)
                    except Cancelled as exc:
                        self._state = None
                        outputs = [exc] * len(part)
                    except Exception:  # e.g. no KV room for the whole group: one at a time, failures in place
                        self._state = None
                        outputs = []
                        for i in part:
                            try:
                                outputs.append(work([built[i]], [i])[0])
                            except Exception as exc:  # noqa: BLE001
                                self._state = None
                                outputs.append(exc)
                    for i, output in zip(part, outputs):
                        results[i] = output
        finally:
            for prompt in built.values():
                self.mtmd.mtmd_input_chunks_free(prompt.chunks)
        return results

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, stop: str | None = None, cancel=None) -> list:
        return self._grouped(list(prompts), lambda group, _: self._generate_group(group, max_new_tokens, stop, cancel))

    def _generate_group(self, group: list[_Prompt], max_new_tokens: int, stop: str | None, cancel=None) -> list:
        """Greedy decoding of the group's sequences, every unfinished one advanced in each decode step
        (decoding on a CPU reads all weights per step: more rows cost little)."""
        try:
            check_cancel(cancel)
            logits, base = self._run_group(group, [[] for _ in group], [[len(p.tail) - 1] for p in group])
            last = [row[-1] for row in logits]
            position = [base + len(p.tail) for p in group]
            generated: list[list[int]] = [[] for _ in group]
            results: list = [None] * len(group)
            started = time.perf_counter()
            while True:
                check_cancel(cancel)
                entries = []
                for j in range(len(group)):
                    if results[j] is not None:
                        continue
                    token = int(np.argmax(last[j]))
                    if token in self.stop_ids:
                        results[j] = generated[j]
                        continue
                    generated[j].append(token)
                    if generation_done(generated[j], max_new_tokens, stop, self.decode):
                        results[j] = generated[j]
                    elif position[j] >= self.context_length:
                        results[j] = ValueError(f"generation ran past the context of {self.context_length} tokens")
                    else:
                        entries.append((token, position[j], j + 1, True))
                        position[j] += 1
                if not entries:
                    break
                rows = self._decode(entries)
                for token, pos, seq, _ in entries:
                    last[seq - 1] = rows[(seq, pos)]
            self.seconds["decode"] += time.perf_counter() - started
            return results
        finally:
            self._release(len(group))

    def score(self, prompts: Sequence[Prompt], scorings: Sequence[Scoring]) -> list:
        if len(prompts) != len(scorings):
            raise ValueError(f"{len(prompts)} prompts but {len(scorings)} scorings")
        return self._grouped(list(prompts), lambda group, indices: self._score_group(group, [scorings[i] for i in indices]))

    def _score_group(self, group: list[_Prompt], scorings: list[Scoring]) -> list:
        from scipy.special import log_softmax

        try:
            outputs = [list(range(len(p.tail) - 1, len(p.tail) - 1 + len(s.forced))) for p, s in zip(group, scorings)]
            logits, _ = self._run_group(group, [list(s.forced) for s in scorings], outputs)
        finally:
            self._release(len(group))
        return [Scores.from_logprobs(log_softmax(rows.astype(np.float64), axis=-1).astype(np.float32), scoring)
                for rows, scoring in zip(logits, scorings)]

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
