"""The reference runtime: transformers Qwen2.5-VL on CPU (fp32/bf16) or CUDA (bf16).

Every processor output goes to the model: without `mm_token_type_ids` transformers 5 silently falls
back to 1-D positions and every logit after the image is wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from dfj import hf
from dfj.images import PixelLimits
from dfj.runtime.base import Runtime
from dfj.sources import Source


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model, processor, device: str, limits: PixelLimits) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.limits = limits
        self.context_length = int(model.config.get_text_config().max_position_embeddings)
        image_processor = processor.image_processor
        # The judge's pixel limits, not whatever the base checkpoint's processor file says.
        image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
        self.chat = hf.ChatEncoder(processor)
        tokenizer = processor.tokenizer
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    @classmethod
    def load(cls, source: Source, device: str = "cpu", dtype: str | None = None, **options: Any) -> "TorchRuntime":
        from transformers import AutoProcessor

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
        torch_dtype = hf.torch_dtype(dtype, device)
        with hf.quiet_transformers():
            if source.kind == "adapter":
                # Unmerged base + adapter: the judge exactly as trained, the reference for merges.
                base = hf.load_model(source.base, dtype=torch_dtype, device=device)
                model = hf.apply_adapter(base, source.path).eval()
                processor_dir = source.base
            else:
                model = hf.load_model(source.path, dtype=torch_dtype, device=device)
                processor_dir = source.path
            processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
        limits = options.get("limits") or source.limits
        return cls(model, processor, device, limits)

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, image: Image.Image, chat: str) -> dict[str, torch.Tensor]:
        inputs = self.chat.encode(image, chat)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def tokenize(self, text: str) -> list[int]:
        return self.chat.tokenize(text)

    def tokenize_plain(self, text: str) -> list[int]:
        return self.chat.tokenize_plain(text)

    def prompt_ids(self, image: Image.Image, chat: str) -> list[int]:
        return self.chat.encode(image, chat)["input_ids"][0].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    # -- work ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, image: Image.Image, chat: str, max_new_tokens: int) -> list[int]:
        from transformers import GenerationConfig

        inputs = self.encode(image, chat)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy, whatever the checkpoint's generation_config.json says
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        with hf.quiet_transformers():  # the checkpoint's sampling flags are overridden on purpose
            output = self.model.generate(**inputs, generation_config=config)
        ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        return ids[:-1] if ids and ids[-1] in self.eos_ids else ids

    @torch.inference_mode()
    def logprobs_ids(self, image: Image.Image, chat: str, ids: list[int]) -> np.ndarray:
        inputs = self.encode(image, chat)
        cont = torch.tensor([ids], dtype=inputs["input_ids"].dtype, device=self.device)
        n = cont.shape[1]
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont)], dim=1)
        # Only the positions that predict the continuation: the full-vocabulary head on every prompt
        # position would cost as much as the layers.
        logits = self.model(**full, logits_to_keep=n + 1, use_cache=False).logits[0, :n]
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    # -- fast path (vision cache, prefix KV reuse): dfj/runtime/torch_cache.py --------------------------
    @property
    def cached(self):
        if getattr(self, "_cached", None) is None:
            from dfj.runtime.torch_cache import CachedForward

            self._cached = CachedForward(self)
        return self._cached

    def generate_ids_cached(self, image, chat, max_new_tokens, prefix_chars, stop=None) -> list[int]:
        return self.cached.generate(image, chat, prefix_chars, max_new_tokens, self.eos_ids, stop)

    def generate_ids_batch(self, items, max_new_tokens, stop=None) -> list:
        try:
            return self.cached.generate_many(items, max_new_tokens, self.eos_ids, stop)
        except Exception:  # e.g. out of memory for the batch: one prompt at a time, failures in place
            return super().generate_ids_batch(items, max_new_tokens, stop)

    def logprobs_ids_cached(self, image, chat, ids, prefix_chars) -> np.ndarray:
        logits = self.cached.teacher_forced(image, chat, prefix_chars, list(ids))
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def logprobs_ids_batch(self, items) -> list:
        try:
            rows = self.cached.teacher_forced_many(items)
        except Exception:  # e.g. out of memory for the batch: one prompt at a time, failures in place
            return super().logprobs_ids_batch(items)
        return [torch.log_softmax(logits, dim=-1).cpu().numpy() for logits in rows]

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": self.device, "dtype": str(next(self.model.parameters()).dtype)}
