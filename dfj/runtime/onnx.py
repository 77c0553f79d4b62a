"""The ONNX Runtime backend: a dfj ONNX artifact (vision, embedding and decoder graphs) on CPU or CUDA.

Host-side work is not rewritten: the transformers processor prepares pixels and token ids,
transformers' vision helpers give the window order and rotary positions, and transformers'
`get_rope_index` gives the 3-row M-RoPE positions. The runtime only feeds the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfj.hf import ChatEncoder
from dfj.images import PixelLimits
from dfj.runtime.base import Runtime, generation_done


def vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any) -> dict[str, torch.Tensor]:
    """Everything the vision graph takes, computed on the host with transformers' own helpers."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    merge = vision_config.spatial_merge_size
    position_ids = get_vision_position_ids(grid_thw, merge)
    window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=merge,
                                                      window_size=vision_config.window_size,
                                                      patch_size=vision_config.patch_size)
    cu_full = get_vision_cu_seqlens(grid_thw)
    patches = torch.arange(pixel_values.shape[0])
    # Segment id of every patch (in window order): attention stays inside a window / inside an image.
    window_segments = torch.searchsorted(cu_window.long(), patches, right=True) - 1
    full_segments = torch.searchsorted(cu_full.long(), patches, right=True) - 1
    return {
        "pixel_values": pixel_values.float(),
        "position_ids": position_ids.long(),
        "window_index": window_index.long(),
        "reverse_index": torch.argsort(window_index).long(),
        "window_segments": window_segments.long(),
        "full_segments": full_segments.long(),
    }


class _RopeHost:
    """Just enough of Qwen2_5_VLModel to call its `get_rope_index` without loading any weights."""

    def __init__(self, config: Any) -> None:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        self.config = config
        self._model_class = Qwen2_5_VLModel

    def get_vision_position_ids(self, *args, **kwargs):
        return self._model_class.get_vision_position_ids(self, *args, **kwargs)

    def get_rope_index(self, *args, **kwargs):
        return self._model_class.get_rope_index(self, *args, **kwargs)


@dataclass
class _Encoded:
    ids: torch.Tensor  # (1, S) the graph's ids: the image pad expanded, forced ids appended
    embeds: np.ndarray  # (1, S, H)
    positions: np.ndarray  # (3, 1, S) M-RoPE positions
    head: int  # leading ids shared by the records of one image and label
    digest: str  # the image's pixels


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, folder: Path, sessions: dict[str, Any], processor: Any, config: Any, info: dict[str, Any],
                 device: str, limits: PixelLimits) -> None:
        self.folder = folder
        self.sessions = sessions
        self.processor = processor
        self.config = config
        self.info = info
        self.device = device
        self.limits = limits
        processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
        self.chat = ChatEncoder(processor)
        tokenizer = processor.tokenizer
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
        self.context_length = int(config.get_text_config().max_position_embeddings)
        self.rope = _RopeHost(config)
        self.image_token_id = config.image_token_id
        self.decoder_inputs = info["decoder_inputs"]
        from collections import OrderedDict

        self.vision_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.prefix_cache: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    @classmethod
    def load(cls, source: Any, device: str = "cpu", dtype: str | None = None, **options: Any) -> "OnnxRuntime":
        """Options: `dfj.runtime.options.RuntimeOptions` (`limits`)."""
        from dfj.runtime.options import RuntimeOptions

        limits = RuntimeOptions.parse("ONNX", options).limits
        if dtype not in (None, "float32", "fp32"):
            raise ValueError(f"an ONNX artifact runs in the precision it was exported with; dtype={dtype!r} is not available")
        info = (source.manifest.extra.get("onnx") if source.manifest is not None else None) or {}
        if "graphs" not in info:
            raise ValueError(f"{source.name} is not a dfj ONNX artifact (its dfj.json records no ONNX graphs); "
                             "export one with --quant onnx-fp32")
        return cls._open(Path(source.path), info, device=device, limits=limits or source.limits)

    @classmethod
    def _open(cls, folder: Path, info: dict, device: str, limits: PixelLimits) -> "OnnxRuntime":
        import onnxruntime as ort
        from transformers import AutoConfig

        from dfj import hf

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device='cuda' needs onnxruntime-gpu with a CUDA device; this onnxruntime has "
                                   f"{', '.join(ort.get_available_providers())}")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = {name: ort.InferenceSession(str(folder / file), sess_options=options, providers=providers)
                    for name, file in info["graphs"].items()}
        with hf.quiet_transformers():
            processor = hf.load_processor(folder)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        return cls(folder, sessions, processor, config, info, device, limits)

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.chat.tokenize_as(text, special)

    def decode(self, ids) -> str:
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- graphs ----------------------------------------------------------------------------------
    def _encode(self, prompt, extra_ids: list[int]) -> "_Encoded":
        """The prompt (plus `extra_ids`) as the decoder's inputs: embeddings with the image's spliced in
        (from the vision cache when these pixels were seen), M-RoPE positions, and the head in the
        graph's ids."""
        inputs = self.chat.encode_ids(prompt.image, prompt.ids)
        ids = inputs["input_ids"]
        types = inputs["mm_token_type_ids"]
        if extra_ids:
            extra = torch.tensor([extra_ids], dtype=ids.dtype)
            ids = torch.cat([ids, extra], dim=1)
            types = torch.cat([types, torch.zeros_like(extra, dtype=types.dtype)], dim=1)
        embeds = self.sessions["embed"].run(None, {"input_ids": ids.numpy()})[0]
        image_embeds, digest = self._image_embeds(inputs)
        is_image = (ids[0] == self.image_token_id).numpy()
        if int(is_image.sum()) != image_embeds.shape[0]:
            raise RuntimeError(f"{int(is_image.sum())} image tokens in the prompt but {image_embeds.shape[0]} image embeddings")
        embeds[0, is_image] = image_embeds
        positions, _ = self.rope.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"],
                                                attention_mask=torch.ones_like(ids))
        # The head counts the image pad once; in the graph's ids it is the image's tokens.
        image_at = prompt.ids.index(self.image_token_id)
        head = prompt.head + (int(is_image.sum()) - 1 if prompt.head > image_at else 0)
        return _Encoded(ids, embeds, positions.numpy(), head, digest)

    def _prefill_group(self, encoded: list["_Encoded"], forced: int):
        """Run the suffixes of prompts that share image and head as one batch on the head's KV state
        (from the prefix cache; none for a prompt without a head, which runs alone). The suffixes are
        left-padded, so every row ends at the same position and the logits read are the same columns for
        all; the mask hides the pads from every query (a pad's own row sees the head, so no row is ever
        fully masked). Returns logits (rows, max(forced, 1), vocab), the KV cache, the mask and each
        row's next M-RoPE position."""
        head = encoded[0].head
        if not head and len(encoded) > 1:
            raise ValueError("prompts without a shared head run one at a time")
        rows = len(encoded)
        lengths = [e.ids.shape[1] - head for e in encoded]
        longest = max(lengths)
        hidden = encoded[0].embeds.shape[-1]
        embeds = np.zeros((rows, longest, hidden), dtype=np.float32)
        positions = np.zeros((3, rows, longest), dtype=np.int64)
        mask = np.zeros((rows, head + longest), dtype=np.int64)
        mask[:, :head] = 1
        for row, (item, length) in enumerate(zip(encoded, lengths)):
            embeds[row, longest - length:] = item.embeds[0, head:]
            positions[:, row, longest - length:] = item.positions[:, 0, head:]
            mask[row, head + longest - length:] = 1
        past = [np.repeat(array, rows, axis=0) for array in self._head_state(encoded[0])] if head else self._empty_past()
        # forced = n: the logits predicting each row's last n ids; 0: the next token's, after the last id.
        index = np.arange(longest - 1 - forced, longest - 1) if forced else np.array([longest - 1])
        logits, cache = self._decode(embeds, mask, positions, index.astype(np.int64), past)
        return logits, cache, mask, [int(e.positions.max()) + 1 for e in encoded]

    def embed_images(self, prompts) -> list:
        from dfj.runtime.base import each

        return each(list(prompts), lambda p: self._image_embeds(self.chat.encode_ids(p.image, p.ids))[0].astype(np.float32))

    def _image_embeds(self, inputs) -> tuple[np.ndarray, str]:
        import hashlib

        digest = hashlib.sha256(inputs["pixel_values"].numpy().tobytes()).hexdigest()
        digest += ":" + ",".join(str(v) for v in inputs["image_grid_thw"].flatten().tolist())
        if digest in self.vision_cache:
            self.vision_cache.move_to_end(digest)
            return self.vision_cache[digest], digest
        vision = vision_inputs(inputs["pixel_values"], inputs["image_grid_thw"], self.config.vision_config)
        image_embeds = self.sessions["vision"].run(None, {k: v.numpy() for k, v in vision.items()})[0]
        self.vision_cache[digest] = image_embeds
        while len(self.vision_cache) > 16:
            self.vision_cache.popitem(last=False)
        return image_embeds, digest

    def _head_state(self, encoded: "_Encoded") -> list[np.ndarray]:
        """The KV arrays of the prompt's head: computed once per image and head ids, then reused (ONNX
        Runtime returns fresh arrays, so a stored state is never modified by later records)."""
        import hashlib

        n = encoded.head
        key = encoded.digest + ":" + hashlib.sha256(encoded.ids[0, :n].numpy().tobytes()).hexdigest()
        if key in self.prefix_cache:
            self.prefix_cache.move_to_end(key)
            return self.prefix_cache[key]
        mask = np.ones((1, n), dtype=np.int64)
        _, cache = self._decode(encoded.embeds[:, :n], mask, encoded.positions[:, :, :n],
                                np.array([n - 1], dtype=np.int64), self._empty_past())
        self.prefix_cache[key] = cache
        while len(self.prefix_cache) > 4:
            self.prefix_cache.popitem(last=False)
        return cache

    def _empty_past(self) -> list[np.ndarray]:
        shape = (1, self.info["num_key_value_heads"], 0, self.info["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.info["num_layers"])]

    def _decode(self, embeds, mask, positions, logits_index, past):
        feed = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), "logits_index": np.asarray(logits_index, dtype=np.int64)}
        feed.update(zip(self.decoder_inputs[4:], past))
        outputs = self.sessions["decoder"].run(None, feed)
        return outputs[0], outputs[1:]

    # -- work ------------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int, stop: str | None = None, cancel=None) -> list:
        """Greedy outputs; prompts sharing image and head decode together, one batch row each (a decode
        step reads the weights once for all rows)."""
        from dfj.runtime.base import by_group

        return by_group(list(prompts), lambda group: self._greedy_group(group, max_new_tokens, stop, cancel),
                        lambda prompt: self._greedy_group([prompt], max_new_tokens, stop, cancel)[0])

    def score(self, prompts, scorings) -> list:
        if len(prompts) != len(scorings):
            raise ValueError(f"{len(prompts)} prompts but {len(scorings)} scorings")
        from dfj.runtime.base import by_group

        return by_group(list(zip(prompts, scorings)), self._scores_group, lambda pair: self._scores_group([pair])[0],
                        prompt_of=lambda pair: pair[0])

    def _greedy_group(self, prompts, max_new_tokens: int, stop: str | None, cancel=None) -> list[list[int]]:
        from dfj.runtime.base import check_cancel

        check_cancel(cancel)
        encoded = [self._encode(prompt, []) for prompt in prompts]
        logits, cache, mask, positions = self._prefill_group(encoded, 0)
        rows = len(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * rows
        while True:
            check_cancel(cancel)
            tokens = [int(t) for t in np.argmax(logits[:, -1], axis=-1)]
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                if token in self.eos_ids:
                    done[row] = True
                    continue
                generated[row].append(token)
                if generation_done(generated[row], max_new_tokens, stop, self.decode):
                    done[row] = True
            if all(done):
                return generated
            # Finished rows keep stepping (their tokens are ignored): one batch shape for the whole loop.
            embeds = self.sessions["embed"].run(None, {"input_ids": np.array(tokens, dtype=np.int64)[:, None]})[0]
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=mask.dtype)], axis=1)
            step = np.array(positions, dtype=np.int64).reshape(1, rows, 1).repeat(3, axis=0)
            positions = [p + 1 for p in positions]
            logits, cache = self._decode(embeds, mask, step, np.array([0], dtype=np.int64), cache)

    def _scores_group(self, pairs) -> list:
        from dfj.runtime.base import Scores

        span = max(len(scoring.forced) for _, scoring in pairs)  # >= 1: a Scoring forces at least one id
        encoded = [self._encode(prompt, list(scoring.forced)) for prompt, scoring in pairs]
        logits = self._prefill_group(encoded, span)[0]
        results = []
        for row, (_, scoring) in enumerate(pairs):
            rows = torch.from_numpy(logits[row, span - len(scoring.forced):]).float()
            results.append(Scores.from_logprobs(torch.log_softmax(rows, dim=-1), scoring))
        return results

    def describe(self) -> dict[str, Any]:
        providers = self.sessions["decoder"].get_providers()
        quant = self.info.get("quantization", {})
        import onnxruntime

        return {"runtime": self.name, "device": self.device, "providers": providers, "quantization": quant,
                "onnxruntime": onnxruntime.__version__}
