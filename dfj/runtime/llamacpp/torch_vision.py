"""The llama.cpp runtime's image encoder in torch (option `vision="torch"` or `"torch-bf16"`).

mtmd runs Qwen2.5-VL's windowed attention as full attention under a mask over every patch of the
image, so it encodes a 1-MP image several times slower than transformers' tower, which attends within
each window (docs/results/llama-server.md). This encoder is that tower, holding the mmproj's own
weights, read back from `mmproj.gguf` through the export's tensor plan (`dfj.tensor_names`): the
artifact is unchanged, and the embeddings go into the text context exactly where mtmd's would
(`Vision.place`), with mtmd's image chunk and positions.

- `"torch"`: float32 arithmetic on the mmproj's values (f16 in a quantized artifact, as mtmd reads
  them; mtmd also rounds activations to f16 in its products, this encoder does not).
- `"torch-bf16"`: bfloat16 arithmetic, on a CPU that multiplies bf16 natively (AMX or AVX512_BF16);
  lossy, as the torch runtime's `bf16=("vision",)`.

It needs torch and transformers (the `torch` extra) and holds the tower's weights in torch (float32:
4 bytes a parameter; the 3B's tower is 0.67 G parameters) beside the mmproj that mtmd keeps mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dfj.images import PixelLimits
from dfj.runtime.options import VisionEncoder
# What clip.cpp fixes for Qwen2.5-VL's projector and the export refuses otherwise (dfj.export.gguf).
MERGE_SIZE, WINDOW_SIZE, TEMPORAL_PATCH = 2, 112, 2


def _field(reader, key: str) -> Any:
    found = reader.fields.get(key)
    if found is None:
        raise ValueError(f"the mmproj lacks {key}")
    return found.contents()


def vision_config(reader) -> dict[str, Any]:
    """transformers' Qwen2.5-VL vision config from the mmproj's `clip.vision.*` metadata."""
    projector = _field(reader, "clip.projector_type")
    if projector != "qwen2.5vl_merger":
        raise ValueError(f"vision='torch' runs Qwen2.5-VL's projector (qwen2.5vl_merger), not {projector!r}")
    if not (reader.fields.get("clip.use_silu") and _field(reader, "clip.use_silu")):
        raise ValueError("vision='torch' runs the released judges' SiLU vision MLP; this mmproj's is not SiLU")
    depth = int(_field(reader, "clip.vision.block_count"))
    period = int(_field(reader, "clip.vision.n_wa_pattern"))
    return {"depth": depth, "hidden_size": int(_field(reader, "clip.vision.embedding_length")),
            "intermediate_size": int(_field(reader, "clip.vision.feed_forward_length")),
            "num_heads": int(_field(reader, "clip.vision.attention.head_count")),
            "out_hidden_size": int(_field(reader, "clip.vision.projection_dim")),
            "patch_size": int(_field(reader, "clip.vision.patch_size")), "hidden_act": "silu", "in_channels": 3,
            "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH, "window_size": WINDOW_SIZE,
            "fullatt_block_indexes": list(range(period - 1, depth, period)) if period else []}


def tower_weights(reader, settings: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, np.ndarray]]:
    """The tower's tensors (transformers key, float32 array), one at a time, put back together from the
    mmproj's (`reader`, a `gguf.GGUFReader`) through the export's plan; every mmproj tensor used, every
    key filled."""
    from dfj.tensor_names import assemble, plan_vision_tensors

    plan = plan_vision_tensors({"visual." + key: shape for key, shape in shapes.items()}, settings)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    missing = sorted({t.name for t in plan} - set(stored))
    extra = sorted(set(stored) - {t.name for t in plan})
    if missing or extra:
        raise ValueError(f"the mmproj does not hold a Qwen2.5-VL tower of its own config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")

    def read(name: str) -> np.ndarray:
        tensor = stored[name]
        if tensor.tensor_type.name not in ("F32", "F16"):
            raise ValueError(f"{name} is {tensor.tensor_type.name}; vision='torch' reads f32 or f16 mmproj tensors")
        return np.asarray(tensor.data)

    for key, value in assemble(plan, {"visual." + key: shape for key, shape in shapes.items()}, read):
        yield key.removeprefix("visual."), value


def vision_tower(config, weights: Callable[[dict[str, tuple[int, ...]]], Iterable[tuple[str, Any]]]):
    """transformers' Qwen2.5-VL vision tower and merger for `config` (a Qwen2_5_VLVisionConfig), built on
    the meta device and given the tensors `weights(shapes)` yields (its {key: shape} in, (key, tensor)
    pairs out), strictly: every key once, nothing left on the meta device."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VisionTransformerPretrainedModel,
                                                                    Qwen2_5_VLVisionRotaryEmbedding)

    from dfj import hf

    with hf.quiet_transformers(), torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(dict(weights(shapes)), strict=True, assign=True)
    model.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(config)  # a buffer computed, not stored
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise AssertionError("the vision tower kept a tensor on the meta device")
    return model.eval()


class TorchVision:
    """transformers' Qwen2.5-VL vision tower and merger with the mmproj's weights; `encode(image)` gives
    the image's embeddings (merged tokens x text width, float32), in mtmd's order."""

    def __init__(self, mmproj: Path, limits: PixelLimits, encoder: VisionEncoder) -> None:
        try:
            import gguf
            import torch
            from transformers import Qwen2VLImageProcessor
            from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        except ImportError as exc:
            raise RuntimeError(f"vision={encoder!r} needs torch and transformers: pip install 'dfj[torch]' ({exc})") from exc
        from dfj.runtime.torch_packed import multiplies_bf16_natively, pack_linears, why_not_packable

        if encoder == "torch-bf16" and not multiplies_bf16_natively():
            raise ValueError("vision='torch-bf16': this CPU multiplies bf16 only by emulation (no AMX, no AVX512_BF16); "
                             "use vision='torch'")
        self.torch = torch
        reader = gguf.GGUFReader(mmproj)
        settings = vision_config(reader)
        self.dtype = torch.bfloat16 if encoder == "torch-bf16" else torch.float32
        # One tensor at a time in its compute dtype: the tower is never held twice.
        model = vision_tower(Qwen2_5_VLVisionConfig(**settings), lambda shapes: (
            (key, torch.from_numpy(value).to(self.dtype)) for key, value in tower_weights(reader, settings, shapes)))
        self.packed = 0 if why_not_packable(model, "cpu") else pack_linears(model)
        self.model = model
        # The training processor's arithmetic: the image arrives fitted to the grid, so its resize keeps
        # the size; mean and std as the mmproj records them (float32, as the processor computes).
        self.processor = Qwen2VLImageProcessor(
            patch_size=settings["patch_size"], temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE_SIZE,
            image_mean=list(_field(reader, "clip.vision.image_mean")), image_std=list(_field(reader, "clip.vision.image_std")),
            size={"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels})
        self.width = settings["out_hidden_size"]

    def encode(self, image) -> np.ndarray:
        torch = self.torch
        inputs = self.processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = self.model(inputs["pixel_values"].to(self.dtype), grid_thw=inputs["image_grid_thw"])
        embeddings = getattr(out, "pooler_output", out)
        return embeddings.float().reshape(-1, self.width).numpy()
