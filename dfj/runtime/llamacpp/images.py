"""mtmd, llama.cpp's multimodal library: a prompt's image block as an image chunk, its encoding by the
mmproj (cached by pixels; or by the torch tower, `torch_vision.py`), and its embeddings placed in a
text context with Qwen2.5-VL's M-RoPE positions.

The image arrives already at its model size (`dfj.images.fit_to_grid`) and mtmd's token limits are the
judge's pixel limits, so mtmd copies it without resampling. Only the block's media marker is given to
mtmd as text: every other id of the prompt is the caller's, so a response cannot add control tokens
or images.
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dfj.images import PATCH_FACTOR, PixelLimits, fit_to_grid
from dfj.prompts import image_block
from dfj.runtime.base import Prompt
from dfj.runtime.options import VisionEncoder

IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VISION_ENTRIES = 16  # image encodings kept


@dataclass
class ImagePrompt:
    """A chat split at its image: text ids before, the mtmd image chunk, text ids after. Owns its
    chunks: `Vision.free` them."""

    head: list[int]
    tail: list[int]
    shared: int  # the tail's first ids that the prompt shares with its group (`Prompt.head`, past the image)
    image_tokens: int
    image_positions: int
    image_key: str
    chunks: Any  # mtmd_input_chunks (owns the image chunk)
    image_chunk: Any
    image: Any = None  # the image at its model size (PIL), for an encoder other than mtmd


class Vision:
    def __init__(self, llama_cpp, model, mmproj: Path, limits: PixelLimits, threads: int, gpu: bool, exact: bool,
                 seconds: dict[str, float], stats: dict[str, int], encoder: VisionEncoder = "mtmd") -> None:
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd, self.model, self.limits = llama_cpp, mtmd_cpp, model, limits
        self.seconds, self.stats = seconds, stats
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        if exact:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # The judge's pixel limits as token limits: an image fitted to them is taken as it is.
        params.image_min_tokens = max(1, limits.min_pixels // PATCH_FACTOR**2)
        params.image_max_tokens = limits.max_pixels // PATCH_FACTOR**2
        self.marker = mtmd_cpp.mtmd_default_marker()
        params.media_marker = self.marker
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp (mtmd) could not load {mmproj}")
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # image key -> mmproj output
        # mtmd still cuts the image chunk and places it (its token count and M-RoPE positions); the torch
        # encoder only computes the embeddings (torch_vision.py says why).
        self.encoder = encoder
        self.torch_vision = None
        if encoder != "mtmd":
            from dfj.runtime.llamacpp.torch_vision import TorchVision

            self.torch_vision = TorchVision(mmproj, limits, encoder)

    def split(self, prepared: Prompt, block_ids: tuple[int, int, int], context_length: int) -> ImagePrompt:
        """The prepared ids split at their image block (`block_ids`: vision start, image pad, vision
        end); mtmd turns the block into its image chunk, with its own start and end text around it."""
        vision_start, image_pad, vision_end = block_ids
        ids = list(prepared.ids)
        at = image_block(ids, image_pad)
        if not (0 < at < len(ids) - 1 and ids[at - 1] == vision_start and ids[at + 1] == vision_end):
            raise ValueError(f"the image pad must sit in the image block {IMAGE_BLOCK!r}")
        image = fit_to_grid(prepared.image, self.limits)
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = self.mtmd.mtmd_bitmap_init(image.width, image.height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = self.mtmd.mtmd_input_chunks_init()
        try:
            text = self.mtmd.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = self.marker, len(self.marker), False, True
            bitmaps = (self.mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = self.mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise RuntimeError(f"mtmd could not tokenize the image block (status {status})")
            before, after, image_chunk = self._chunks(chunks)
            if before != [vision_start] or after != [vision_end]:
                raise RuntimeError(f"mtmd wraps the image as {before} ... {after}, not in the prompt's image block")
        except BaseException:
            self.mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            self.mtmd.mtmd_bitmap_free(bitmap)
        built = ImagePrompt(ids[:at], ids[at + 1:], max(0, prepared.head - (at + 1)),
                            self.mtmd.mtmd_input_chunk_get_n_tokens(image_chunk),
                            self.mtmd.mtmd_input_chunk_get_n_pos(image_chunk), prepared.image_key, chunks, image_chunk,
                            image if self.torch_vision is not None else None)
        needed = len(built.head) + built.image_positions + len(built.tail)
        if needed > context_length:
            self.free(built)
            raise ValueError(f"prompt needs {needed} positions; the context holds {context_length}")
        return built

    def _chunks(self, chunks) -> tuple[list[int], list[int], Any]:
        """The text ids before and after mtmd's one image chunk, and the chunk."""
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
        return before, after, image_chunk

    def free(self, prompt: ImagePrompt) -> None:
        self.mtmd.mtmd_input_chunks_free(prompt.chunks)

    def encode(self, prompt: ImagePrompt) -> np.ndarray:
        """The mmproj output for the prompt's image, from the cache when this image was seen."""
        cached = self._embeddings.get(prompt.image_key)
        if cached is not None:
            self._embeddings.move_to_end(prompt.image_key)
            self.stats["vision_hits"] += 1
            return cached
        self.stats["vision_misses"] += 1
        started = time.perf_counter()
        width = self.llama_cpp.llama_model_n_embd_inp(self.model)
        if self.torch_vision is not None:
            embeddings = np.ascontiguousarray(self.torch_vision.encode(prompt.image), dtype=np.float32)
            if embeddings.shape != (prompt.image_tokens, width):
                raise RuntimeError(f"the torch vision tower gave {embeddings.shape} embeddings; mtmd's image chunk "
                                   f"holds {prompt.image_tokens} tokens of width {width}")
        else:
            if self.mtmd.mtmd_encode_chunk(self.ctx, prompt.image_chunk) != 0:
                raise RuntimeError("mtmd could not encode the image")
            pointer = self.mtmd.mtmd_get_output_embd(self.ctx)
            embeddings = np.ctypeslib.as_array(pointer, shape=(prompt.image_tokens, width)).copy()
        self.seconds["vision"] += time.perf_counter() - started
        self._embeddings[prompt.image_key] = embeddings
        while len(self._embeddings) > VISION_ENTRIES:
            self._embeddings.popitem(last=False)
        return embeddings

    def place(self, text_ctx, prompt: ImagePrompt, embeddings: np.ndarray, batch: int) -> int:
        """Decode the image's embeddings into sequence 0 of `text_ctx` after the prompt's head; the
        position after the image (it advances by the merged grid's larger side, not by token count)."""
        end = self.llama_cpp.llama_pos(0)
        no_callback = self.mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer
        status = self.mtmd.mtmd_helper_decode_image_chunk(
            self.ctx, text_ctx, prompt.image_chunk, embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            len(prompt.head), 0, batch, ctypes.byref(end), no_callback, None)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not evaluate the image (status {status})")
        return end.value

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
