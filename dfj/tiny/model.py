"""Tiny DFJ judges, built locally and deterministically (no hub, no download).

The judges have the real Qwen2.5-VL architecture and the real Qwen2.5 tokenizer, with small widths:
text hidden size 256 (K-quant rows need multiples of 256) and a 4-layer vision tower with window
and full attention, so every export path meets the same structure as the 3B/7B judges.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from dfj import prompts
from dfj.images import MAX_PIXELS, MIN_PIXELS
from dfj.manifest import Manifest, write_manifest
from dfj.tiny.tokenizer import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    write_qwen25_vl_tokenizer,
)

# Shapes of the tiny judge. mrope_section must sum to head_dim / 2 (64 / 2).
TINY_TEXT = dict(
    vocab_size=151936,  # the 3B checkpoint's padded embedding size; the tokenizer uses 151665 rows
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # wide enough that greedy output depends on the input
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
    bos_token_id=ENDOFTEXT_ID,
    eos_token_id=IM_END_ID,
)
TINY_VISION = dict(
    depth=4,
    hidden_size=128,
    intermediate_size=256,
    num_heads=4,
    out_hidden_size=256,
    fullatt_block_indexes=[1, 3],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    initializer_range=0.1,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The vision MLP reuses gate/up/down_proj names: exclude the tower, as ms-swift's --freeze_vit did.
LORA_EXCLUDE = r".*visual.*"

DFJ_NAMES = {"pointwise": "Qwen-2.5-VL-Instruct-3B-Pointwise-DFJ", "pairwise": "Qwen-2.5-VL-Instruct-3B-Pairwise-DFJ"}


def tiny_config(tied: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(TINY_TEXT),
        vision_config=dict(TINY_VISION),
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tied,
        initializer_range=0.1,
    )


def write_processor(folder: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> None:
    """Processor files (tokenizer, image/video processors, chat template) for a Qwen2.5-VL folder."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok_dir = folder / ".tokenizer-src"
    write_qwen25_vl_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=prompts.chat_template(),
    )
    processor.save_pretrained(folder)


def lora_config(rank: int):
    """The judges' LoRA: the language model's linear layers, alpha = 2r as the DFJ recipe (r 32, alpha 64)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, exclude_modules=LORA_EXCLUDE,
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def with_lora(model, rank: int):
    """`model` wrapped in a fresh peft LoRA (`lora_config`); draws from torch's global generator."""
    from peft import get_peft_model

    from dfj.hf import peft_without_gptq_probe

    with peft_without_gptq_probe():
        return get_peft_model(model, lora_config(rank))


def generation_config():
    from transformers import GenerationConfig

    # The Qwen2.5-VL-Instruct release's sampling defaults: the runtimes must override them for greedy.
    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        do_sample=True,
        repetition_penalty=1.05,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
    )


def build_tiny_judge(
    path: str | os.PathLike,
    mode: str,
    seed: int = 0,
    adapter: bool = False,
    *,
    tied: bool = False,
    adapter_layout: str = "peft",
    lora_rank: int = 8,
    lora_scale: float = 0.05,
) -> Path:
    """Write a deterministic, randomly initialised tiny DFJ judge under `path`; return the folder to load.

    adapter=False: `path` is a standalone model folder (fp32 safetensors, processor, dfj manifest).
    adapter=True: `path/base` holds the base model and `path/adapter` a peft LoRA adapter on the
    language model only (non-zero B, so it changes the output), written in the layout ms-swift
    writes; `adapter_layout="legacy"` writes the pre-transformers-5 key layout
    (`base_model.model.model.layers.*`). Returns the adapter folder, which names its base.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    prompts.check_mode(mode)
    if adapter_layout not in ("peft", "legacy"):
        raise ValueError("adapter_layout is 'peft' or 'legacy'")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "base" if adapter else root
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tied)).to(torch.float32).eval()
    model.generation_config = generation_config()
    model.save_pretrained(model_dir)
    write_processor(model_dir)
    write_manifest(
        model_dir,
        Manifest.for_judge(mode, "safetensors", {"kind": "dfj.tiny.build_tiny_judge", "seed": seed, "tied": tied}),
    )
    if not adapter:
        return model_dir
    return _write_adapter(model, model_dir, root / "adapter", mode, seed, adapter_layout, lora_rank, lora_scale)


def _write_adapter(model, base_dir: Path, out: Path, mode: str, seed: int, layout: str, rank: int, scale: float) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    peft_model = with_lora(model, rank)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # a fresh LoRA has B = 0 and changes nothing
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if layout == "legacy":
        weights = out / "adapter_model.safetensors"
        tensors = load_file(weights)
        legacy = {k.replace("base_model.model.model.language_model.", "base_model.model.model."): v for k, v in tensors.items()}
        save_file(legacy, weights, metadata={"format": "pt"})
    peft_model.unload()
    write_manifest(
        out,
        Manifest.for_judge(mode, "adapter", {"kind": "dfj.tiny.build_tiny_judge", "seed": seed, "layout": layout}),
    )
    return out
