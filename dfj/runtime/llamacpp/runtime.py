"""`LlamaCppRuntime`: the runtime contract on llama.cpp's text context and mtmd.

Prompts arrive as token ids (made with this runtime's own tokenizer: the template's text with its
control tokens, the label and responses as plain text). KV sequence 0 holds the head a group of
prompts shares (same image and label: the chat up to the first response) and is kept between calls,
so the next group on that image and label runs only what follows it. Each prompt of a group is a
sequence of its own that starts as a copy of sequence 0; the group's suffixes run in one decode batch,
and greedy decoding advances every unfinished sequence in each step (decoding on a CPU reads all
weights per step: more rows cost little). Groups are `dfj.groups.GROUP_SIZE` prompts at most.
"""

from __future__ import annotations

import os
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dfj.groups import GROUP_SIZE
from dfj.images import PixelLimits
from dfj.layout import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE
from dfj.runtime.base import Prompt, Runtime, Scores, Scoring, by_group, check_cancel, each, generation_done
from dfj.runtime.llamacpp.context import BATCH, TextContext
from dfj.runtime.llamacpp.images import ImagePrompt, Vision
from dfj.runtime.llamacpp.library import cpu_backend, quiet_llama
from dfj.runtime.options import VisionEncoder
from dfj.version import package_version

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
DEFAULT_CONTEXT = 8192


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


class LlamaCppRuntime(Runtime):
    name = "llamacpp"

    def __init__(self, folder: Path, limits: PixelLimits, device: str = "cpu", context: int = DEFAULT_CONTEXT,
                 threads: int | None = None, normalizer: str | None = "manifest", vision: VisionEncoder = "mtmd") -> None:
        llama_cpp = quiet_llama(folder / GGUF_TEXT_FILE)
        self.llama_cpp = llama_cpp
        self.folder, self.limits, self.device = folder, limits, device
        threads = threads or os.cpu_count() or 1
        gpu = device.startswith("cuda")
        if gpu and not llama_cpp.llama_supports_gpu_offload():
            raise RuntimeError("device='cuda' needs llama-cpp-python built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on)")
        if gpu and vision != "mtmd":
            raise ValueError(f"vision={vision!r} encodes on the CPU; with device='cuda' mtmd encodes on the GPU")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu else 0
        self.model = llama_cpp.llama_model_load_from_file(str(folder / GGUF_TEXT_FILE).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {folder / GGUF_TEXT_FILE}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        trained = llama_cpp.llama_model_n_ctx_train(self.model)
        self.context_length = min(context, trained) if trained > 0 else context
        exact = llama_cpp.llama_model_ftype(self.model) == 0
        # Seconds per stage (for the speed benchmark): image encoding, prompt prefill, decoding.
        self.seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        self.stats = {"vision_hits": 0, "vision_misses": 0, "prefix_hits": 0, "prefix_misses": 0}
        self.text = TextContext(llama_cpp, self.model, self.context_length, threads, GROUP_SIZE, exact)
        self.vision = Vision(llama_cpp, self.model, folder / GGUF_MMPROJ_FILE, limits, threads, gpu, exact,
                             self.seconds, self.stats, encoder=vision)
        self.normalizer = _normalizer(folder) if normalizer == "manifest" else normalizer
        self.stop_ids = {self.tokenize(t, True)[0] for t in STOP_TOKENS}
        self.block_ids = tuple(self.tokenize(t, True)[0] for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
        self._state: _KvState | None = None

    @classmethod
    def load(cls, source: Any, device: str = "cpu", dtype: str | None = None, **options: Any) -> "LlamaCppRuntime":
        """Options: `dfj.runtime.options.LlamaCppOptions` (`limits`, `context` positions (default 8,192),
        `threads`, `normalizer`: the source tokenizer's Unicode normalisation, default as the manifest records;
        `vision`: the image encoder, "mtmd" (default), "torch" or "torch-bf16" (torch_vision.py))."""
        from dfj.runtime.options import LlamaCppOptions

        opts = LlamaCppOptions.parse("llama.cpp", options)
        if dtype not in (None, "float32", "fp32", "auto"):
            raise ValueError(f"a GGUF artifact runs in the precision it was exported with; dtype={dtype!r} is not available")
        folder = Path(source.path)
        if not (folder / GGUF_TEXT_FILE).is_file() or not (folder / GGUF_MMPROJ_FILE).is_file():
            raise ValueError(f"{source.name} is not a dfj GGUF artifact ({GGUF_TEXT_FILE} + {GGUF_MMPROJ_FILE}); "
                             "export one with --quant gguf-f16")
        return cls(folder, opts.limits or source.limits, device=device, context=opts.context or DEFAULT_CONTEXT,
                   threads=opts.threads, normalizer=opts.normalizer, vision=opts.vision)

    def close(self) -> None:
        """Free the native objects now (they are also freed when the runtime is collected)."""
        for part in ("vision", "text"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()
        if getattr(self, "model", None):
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool) -> list[int]:
        normalized = unicodedata.normalize(self.normalizer, text) if self.normalizer else text
        data = normalized.encode("utf-8")
        size = len(data) + 8
        while True:
            out = (self.llama_cpp.llama_token * size)()
            n = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), out, size, False, special)
            if n >= 0:
                return list(out[:n])
            size = -n

    def decode(self, ids: Sequence[int]) -> str:
        import ctypes

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

    # -- images ----------------------------------------------------------------------------------
    @contextmanager
    def _split(self, prompts: Sequence[Prompt]) -> Iterator[list[ImagePrompt]]:
        built: list[ImagePrompt] = []
        try:
            for prompt in prompts:
                built.append(self.vision.split(prompt, self.block_ids, self.context_length))  # type: ignore[arg-type]
            yield built
        finally:
            for prompt in built:
                self.vision.free(prompt)

    def embed_images(self, prompts: Sequence[Prompt]) -> list:
        def embed(prepared: Prompt) -> np.ndarray:
            with self._split([prepared]) as (prompt,):
                return self.vision.encode(prompt).copy()

        return each(list(prompts), embed)

    # -- KV sequences ----------------------------------------------------------------------------------
    def _shared(self, prompt: ImagePrompt, common: list[int]) -> int:
        """Make sequence 0 hold the prompt's head, its image and `common` (the text all sequences of the
        group share); returns the position where the text after the image starts. Sequence 0 is kept
        between calls: what it already holds for this image and head is not run again."""
        state, self._state = self._state, None
        if state and state.image_key == prompt.image_key and state.head == prompt.head:
            base = state.image_end
            # All of it or none past the image: text run in two batches would round otherwise than in one,
            # and a verdict would depend on what ran before it.
            reuse = len(common) if state.tokens == common else 0
            self.text.truncate(0, base + reuse)
            self.stats["prefix_hits"] += 1
        else:
            embeddings = self.vision.encode(prompt)
            self.stats["prefix_misses"] += 1
            started = time.perf_counter()
            self.text.clear()
            self.text.decode([(token, i, 0, False) for i, token in enumerate(prompt.head)])
            base, reuse = self.vision.place(self.text.ctx, prompt, embeddings, BATCH), 0
            self.seconds["prefill"] += time.perf_counter() - started
        started = time.perf_counter()
        self.text.decode([(token, base + i, 0, False) for i, token in enumerate(common[reuse:], start=reuse)])
        self.seconds["prefill"] += time.perf_counter() - started
        self._state = _KvState(prompt.image_key, prompt.head, base, list(common))
        return base

    def _run_group(self, group: list[ImagePrompt], extras: list[list[int]], outputs: list[list[int]]) -> tuple[list[np.ndarray], int]:
        """Run the prompts of one group (same image and head) as sequences 1..n, each a copy of sequence
        0's shared KV followed by its own tokens, all in one decode batch. Returns each prompt's logits
        at `outputs` (indices into its tail + extra) and the position where the text after the image starts."""
        tokens = [p.tail + e for p, e in zip(group, extras)]
        # Sequence 0 runs at most what the prompts declare shared (the chat up to the first response),
        # whatever else the group holds: each prompt's own text then runs in one batch, alone or grouped.
        # (Split by the group's common prefix, a record judged alone ran its last few tokens as a small
        # batch, which llama.cpp's quantized kernels round otherwise: P(A) moved by up to 5e-3 on Q8_0.)
        shared = min([_common_prefix(tokens[0], t) for t in tokens] + [min(o) for o in outputs] + [p.shared for p in group])
        base = self._shared(group[0], tokens[0][:shared])
        entries = []
        for seq, (sequence, wanted) in enumerate(zip(tokens, outputs), start=1):
            self.text.fork(seq)
            wanted_set = set(wanted)
            entries.extend((token, base + i, seq, i in wanted_set) for i, token in enumerate(sequence[shared:], start=shared))
        started = time.perf_counter()
        rows = self.text.decode(entries)
        self.seconds["prefill"] += time.perf_counter() - started
        return [np.stack([rows[(seq, base + i)] for i in wanted]) for seq, wanted in enumerate(outputs, start=1)], base

    # -- work ------------------------------------------------------------------------------------
    def _grouped(self, prompts: Sequence[Prompt], work: Callable[[list[ImagePrompt], list[int]], list]) -> list:
        """`work` on each group of prompts sharing image and head (`GROUP_SIZE` at most), with their
        indices; a group that fails runs again one prompt at a time (`base.by_group`). Sequence 0 is
        forgotten after a failure: it may hold half of what a group ran."""
        def run(group: list[int]) -> list:
            try:
                with self._split([prompts[i] for i in group]) as built:
                    return work(built, group)
            except BaseException:
                self._state = None
                raise

        return by_group(list(range(len(prompts))), run, lambda index: run([index])[0], prompt_of=lambda i: prompts[i],
                        size=GROUP_SIZE)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, stop: str | None = None, cancel=None) -> list:
        return self._grouped(list(prompts), lambda group, _: self._generate_group(group, max_new_tokens, stop, cancel))

    def _generate_group(self, group: list[ImagePrompt], max_new_tokens: int, stop: str | None, cancel=None) -> list:
        """Greedy decoding of the group's sequences, every unfinished one advanced in each decode step."""
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
                rows = self.text.decode(entries)
                for token, pos, seq, _ in entries:
                    last[seq - 1] = rows[(seq, pos)]
            self.seconds["decode"] += time.perf_counter() - started
            return results
        finally:
            self.text.release(len(group))

    def score(self, prompts: Sequence[Prompt], scorings: Sequence[Scoring]) -> list:
        if len(prompts) != len(scorings):
            raise ValueError(f"{len(prompts)} prompts but {len(scorings)} scorings")
        return self._grouped(list(prompts), lambda group, indices: self._score_group(group, [scorings[i] for i in indices]))

    def _score_group(self, group: list[ImagePrompt], scorings: list[Scoring]) -> list:
        from scipy.special import log_softmax

        try:
            outputs = [list(range(len(p.tail) - 1, len(p.tail) - 1 + len(s.forced))) for p, s in zip(group, scorings)]
            logits, _ = self._run_group(group, [list(s.forced) for s in scorings], outputs)
        finally:
            self.text.release(len(group))
        return [Scores.from_logprobs(log_softmax(rows.astype(np.float64), axis=-1).astype(np.float32), scoring)
                for rows, scoring in zip(logits, scorings)]

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": self.device, "context": self.context_length,
                "vision_encoder": self.vision.encoder, "llama_cpp_python": package_version("llama_cpp_python"),
                **cpu_backend().describe()}


def _normalizer(folder: Path) -> str | None:
    """The Unicode normalisation the source tokenizer applied (recorded at export; Qwen2.5: NFC)."""
    from dfj.manifest import read_manifest

    manifest = read_manifest(folder)
    return (manifest.extra.get("gguf", {}) if manifest else {}).get("normalizer", "NFC")
