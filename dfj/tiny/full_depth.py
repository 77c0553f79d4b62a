"""Random-weight judges at the released shapes (Qwen2.5-VL-3B/7B-Instruct, every layer) to measure
export and quantization at full depth without the real weights, which this project cannot download.

The base checkpoint is written tensor by tensor (`dfj.artifact.checkpoint.write_shards`): the model is
never materialized, so a 7B judge is built on a machine with less memory than its weights. The LoRA
adapter targets the language model's linear layers as the DFJ recipe does (rank 32, alpha 64), with
non-zero B so that the merge changes every targeted weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The released judges' shapes: the 3B ties its head to the embedding, the 7B does not.
REAL_TEXT: dict[str, dict[str, Any]] = {
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
REAL_VISION: dict[str, Any] = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14,
                                   spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, hidden_act="silu")
LORA_RANK, LORA_ALPHA = 32, 64  # the DFJ recipe's


def judge_config(text: dict[str, Any], vision: dict[str, Any]):
    """A Qwen2.5-VL config from text and vision shapes (the rest as the released checkpoints)."""
    from transformers import Qwen2_5_VLConfig

    from dfj.tiny.tokenizer import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

    text = dict(text)
    tied = text.pop("tie_word_embeddings", False)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2  # M-RoPE sections (t, h, w) in the released 1/4, 3/8, 3/8 split
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text.update(max_position_embeddings=128000, rms_norm_eps=1e-6, bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections})
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, image_token_id=IMAGE_PAD_ID,
                            video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
                            vision_end_token_id=VISION_END_ID)


def real_shapes(size: str, text_layers: int | None = None, vision_depth: int | None = None) -> tuple[dict, dict]:
    if size not in REAL_TEXT:
        raise ValueError(f"unknown size {size!r}: {', '.join(REAL_TEXT)}")
    text = {**REAL_TEXT[size], **({"num_hidden_layers": text_layers} if text_layers else {})}
    vision = dict(REAL_VISION)
    if vision_depth:
        period = 8 if vision_depth >= 8 else vision_depth
        vision.update(depth=vision_depth, fullatt_block_indexes=list(range(period - 1, vision_depth, period)))
    return text, vision


def build_random_judge(root: str | os.PathLike, text: dict[str, Any], vision: dict[str, Any], *, dtype: str = "bfloat16",
                       seed: int = 0, mode: str = "pointwise") -> Path:
    """Write `root/base` (random weights, real tokenizer and processor) and `root/adapter` (a LoRA on
    it); return the adapter folder. Memory: one tensor at a time."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dfj import hf
    from dfj.artifact.checkpoint import PlannedTensor, torch_dtype_code, write_shards
    from dfj.manifest import Manifest, write_manifest
    from dfj.tiny.model import LORA_EXCLUDE, LORA_TARGETS, write_processor

    root = Path(root)
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    config = judge_config(text, vision)
    with init_empty_weights():
        skeleton = Qwen2_5_VLForConditionalGeneration._from_config(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    target = hf.torch_dtype(dtype, "cpu")
    keys = sorted(shapes)

    def produce(key: str):
        generator = torch.Generator().manual_seed(seed * 100003 + keys.index(key))
        if "norm" in key and key.endswith("weight"):
            return torch.ones(shapes[key], dtype=target)
        fan_in = shapes[key][-1] if len(shapes[key]) > 1 else 1
        return (torch.randn(shapes[key], generator=generator) * min(0.02, fan_in ** -0.5)).to(target)

    write_shards(base, [PlannedTensor(key, shapes[key], torch_dtype_code(target)) for key in keys], produce)
    config.dtype = dtype
    config.save_pretrained(base)
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": config.text_config.bos_token_id,
                                                             "eos_token_id": config.text_config.eos_token_id}) + "\n")
    write_processor(base)

    adapter.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + 1)
    lora: dict[str, torch.Tensor] = {}
    for key in keys:
        if ".visual." in f".{key}" or not key.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)):
            continue
        out_features, in_features = shapes[key]
        module = "base_model.model." + key.removesuffix(".weight")
        lora[f"{module}.lora_A.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) * in_features ** -0.5
        lora[f"{module}.lora_B.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) * 0.01
    save_file(lora, adapter / hf.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (adapter / hf.ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": list(LORA_TARGETS), "exclude_modules": LORA_EXCLUDE, "rank_pattern": {}, "alpha_pattern": {},
        "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "inference_mode": True}, indent=2) + "\n")
    write_manifest(adapter, Manifest.for_judge(mode, "adapter", {"kind": "dfj.tiny.full_depth", "seed": seed,
                                                                 "text": text, "vision": vision, "dtype": dtype}))
    return adapter
