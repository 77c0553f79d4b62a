"""The ONNX Runtime backend: a dfj ONNX artifact (vision, embedding and decoder graphs) on CPU or CUDA.

Host-side work is not rewritten: the transformers processor prepares pixels and token ids,
transformers' vision helpers give the window order and rotary positions, and transformers'
`get_rope_index` gives the 3-row M-RoPE positions. The runtime only feeds the graphs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dfj.images import PixelLimits
from dfj.runtime.base import Runtime


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
        tokenizer = processor.tokenizer
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
        self.context_length = int(config.get_text_config().max_position_embeddings)
        self.rope = _RopeHost(config)
        self.image_token_id = config.image_token_id
        self.decoder_inputs = info["decoder_inputs"]

    @classmethod
    def load(cls, source: Any, device: str = "cpu", dtype: str | None = None, **options: Any) -> "OnnxRuntime":
        if dtype not in (None, "float32", "fp32"):
            raise ValueError(f"an ONNX artifact runs in the precision it was exported with; dtype={dtype!r} is not available")
        if not (Path(source.path) / "onnx.json").is_file():
            raise ValueError(f"{source.name} is not a dfj ONNX artifact (no onnx.json); export one with --quant onnx-fp32")
        return cls.from_folder(Path(source.path), device=device, limits=options.get("limits") or source.limits)

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu", limits: PixelLimits | None = None) -> "OnnxRuntime":
        import onnxruntime as ort
        from transformers import AutoConfig, AutoProcessor

        from dfj import hf

        info = json.loads((folder / "onnx.json").read_text(encoding="utf-8"))
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
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        return cls(folder, sessions, processor, config, info, device, limits or PixelLimits())

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    # -- graphs ----------------------------------------------------------------------------------
    def _prefill(self, image: Image.Image, chat: str, extra_ids: list[int], logits_index: np.ndarray | None):
        """Run the prompt (plus `extra_ids`) from an empty cache. Returns logits, the KV cache, the
        attention mask and the next M-RoPE position."""
        inputs = self.processor(text=[chat], images=[image], return_tensors="pt")
        ids = inputs["input_ids"]
        types = inputs["mm_token_type_ids"]
        if extra_ids:
            extra = torch.tensor([extra_ids], dtype=ids.dtype)
            ids = torch.cat([ids, extra], dim=1)
            types = torch.cat([types, torch.zeros_like(extra, dtype=types.dtype)], dim=1)
        mask = torch.ones_like(ids)
        embeds = self.sessions["embed"].run(None, {"input_ids": ids.numpy()})[0]
        vision = vision_inputs(inputs["pixel_values"], inputs["image_grid_thw"], self.config.vision_config)
        image_embeds = self.sessions["vision"].run(None, {k: v.numpy() for k, v in vision.items()})[0]
        is_image = (ids[0] == self.image_token_id).numpy()
        if int(is_image.sum()) != image_embeds.shape[0]:
            raise RuntimeError(f"{int(is_image.sum())} image tokens in the prompt but {image_embeds.shape[0]} image embeddings")
        embeds[0, is_image] = image_embeds
        positions, _ = self.rope.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
        length = ids.shape[1]
        if logits_index is None:
            logits_index = np.array([length - 1], dtype=np.int64)
        past = self._empty_past()
        logits, cache = self._decode(embeds, mask.numpy(), positions.numpy(), logits_index, past)
        return logits, cache, mask.numpy(), int(positions.max()) + 1

    def _empty_past(self) -> list[np.ndarray]:
        shape = (1, self.info["num_key_value_heads"], 0, self.info["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.info["num_layers"])]

    def _decode(self, embeds, mask, positions, logits_index, past):
        feed = {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), "logits_index": np.asarray(logits_index, dtype=np.int64)}
        feed.update(zip(self.decoder_inputs[4:], past))
        outputs = self.sessions["decoder"].run(None, feed)
        return outputs[0], outputs[1:]

    def prompt_logits(self, image: Image.Image, chat: str, positions: int = 24) -> np.ndarray:
        """Logits at the last `positions` positions of `chat` (the export parity probe)."""
        ids_length = self.processor(text=[chat], images=[image], return_tensors="pt")["input_ids"].shape[1]
        index = np.arange(ids_length - positions, ids_length, dtype=np.int64)
        logits, *_ = self._prefill(image, chat, [], index)
        return logits[0]

    # -- work ------------------------------------------------------------------------------------
    def generate_ids(self, image: Image.Image, chat: str, max_new_tokens: int) -> list[int]:
        logits, cache, mask, position = self._prefill(image, chat, [], None)
        generated: list[int] = []
        while True:
            token = int(np.argmax(logits[0, -1]))
            if token in self.eos_ids:
                break
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
            embeds = self.sessions["embed"].run(None, {"input_ids": np.array([[token]], dtype=np.int64)})[0]
            mask = np.concatenate([mask, np.ones((1, 1), dtype=mask.dtype)], axis=1)
            positions = np.full((3, 1, 1), position, dtype=np.int64)
            position += 1
            logits, cache = self._decode(embeds, mask, positions, np.array([0], dtype=np.int64), cache)
        return generated

    def logprobs_ids(self, image: Image.Image, chat: str, ids: list[int]) -> np.ndarray:
        prompt_length = self.processor(text=[chat], images=[image], return_tensors="pt")["input_ids"].shape[1]
        index = np.arange(prompt_length - 1, prompt_length - 1 + len(ids), dtype=np.int64)
        logits, *_ = self._prefill(image, chat, list(ids), index)
        logits = torch.from_numpy(logits[0]).float()
        return torch.log_softmax(logits, dim=-1).numpy()

    def describe(self) -> dict[str, Any]:
        providers = self.sessions["decoder"].get_providers()
        quant = self.info.get("quantization", {})
        return {"runtime": self.name, "device": self.device, "providers": providers, "quantization": quant}
