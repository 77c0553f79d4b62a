"""GGUF export for llama.cpp: a text GGUF (arch `qwen2vl`) and an mmproj GGUF (arch `clip`).

Written with the PyPI `gguf` package: its `TensorNameMap` names every Hugging Face tensor, and its
writer takes the tensors one at a time as they are read from the memory-mapped checkpoint (peak
memory is the biggest tensor, not the model). Which GGUF tensor each checkpoint tensor becomes (the
vision qkv split into q/k/v, the Conv3D patch embedding into its two temporal kernels; a tensor the
map does not know is an error, never dropped) is `dfj.tensor_names`, which the llama.cpp
runtime also reads the mmproj back with; the M-RoPE sections are padded to four here. This module writes the lossless files (f32, f16); K-quants and Q8_0 are a stage of their own
(`dfj.quant.gguf`, llama.cpp's quantizer). The mmproj is f16 (f32 for `gguf-f32`).

The LoRA is merged first (streamed, with the merge's own parity check); the result is checked against
transformers (layers streamed from disk past a memory budget) on the export probe through the
llama.cpp runtime before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dfj import hf, tolerances
from dfj.artifact.checkpoint import Checkpoint
from dfj.tensor_names import GgufTensor, plan_tensors
from dfj.export.lora_merge import adapter_record
from dfj.artifact.staging import staged_folder
from dfj.images import PixelLimits
from dfj.manifest import write_manifest
from dfj.layout import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE
from dfj.version import package_version

QUANTS = ("f32", "f16")
# llama_ftype of the files written here (llama.h); the quantized ones are `dfj.quant.gguf`'s.
LLAMA_FTYPES = {"f32": 0, "f16": 1}
# llama.cpp reads clip.vision.image_size only to size its warm-up image; Qwen2.5-VL has no fixed size.
WARMUP_IMAGE_SIZE = 560
# Text positions the export probe's chat may take (556 for pointwise with the Qwen2.5 tokenizer); more
# fails loudly ("prompt needs N positions").


def _torch_dtypes() -> dict[type, Any]:
    import torch

    return {np.float16: torch.float16, np.float32: torch.float32}


def _gguf_dtype(shape: tuple[int, ...], dtype: str) -> type:
    """f16 files keep norms and biases (1-D) in f32, as llama.cpp's own converter does."""
    return np.float16 if dtype == "f16" and len(shape) > 1 else np.float32


def _write(path: Path, arch: str, metadata: Callable[[Any], None], tensors: list[GgufTensor],
           read: Callable[[str], Any], dtype: str) -> None:
    """Stream `tensors` into a GGUF file: infos first, then one tensor in memory at a time."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    metadata(writer)
    converted = [(t, _gguf_dtype(t.shape, dtype)) for t in tensors]
    for tensor, np_dtype in converted:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np_dtype),
                               int(np.prod(tensor.shape)) * np.dtype(np_dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    torch_dtypes = _torch_dtypes()
    cache: tuple[str, Any] | None = None
    for tensor, np_dtype in converted:
        if cache is None or cache[0] != tensor.key:  # qkv / patch splits read their source once
            cache = (tensor.key, read(tensor.key))
        data = cache[1] if tensor.take is None else tensor.take(cache[1])
        # Straight from the checkpoint's dtype to the file's (bf16 -> f16 needs no f32 copy).
        data = data.to(torch_dtypes[np_dtype]).contiguous().numpy()
        if data.shape != tensor.shape:
            raise ValueError(f"{tensor.key}: shape {data.shape} is not the planned {tensor.shape}")
        writer.write_tensor_data(data)
        del data
    writer.close()


def _reader(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Any]]:
    """{key: shape} of the checkpoint, and a function reading one tensor (torch, in its own dtype)."""
    checkpoint = Checkpoint(model_dir)
    return dict(checkpoint.shapes), checkpoint.read


def _text_metadata(config: dict[str, Any], model_dir: Path, name: str, dtype: str) -> Callable[[Any], None]:
    import gguf

    text_config = config.get("text_config", config)
    rope = text_config.get("rope_parameters") or text_config.get("rope_scaling") or {}
    sections = list(rope.get("mrope_section") or [])
    if not sections or len(sections) > 4:
        raise ValueError(f"config has no usable M-RoPE sections (rope parameters: {rope})")
    rope_theta = rope.get("rope_theta", text_config.get("rope_theta"))
    tokens, types = _vocabulary(model_dir, text_config["vocab_size"])

    def write(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(LLAMA_FTYPES[dtype])
        writer.add_context_length(text_config["max_position_embeddings"])
        writer.add_embedding_length(text_config["hidden_size"])
        writer.add_block_count(text_config["num_hidden_layers"])
        writer.add_feed_forward_length(text_config["intermediate_size"])
        writer.add_head_count(text_config["num_attention_heads"])
        writer.add_head_count_kv(text_config["num_key_value_heads"])
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_layer_norm_rms_eps(float(text_config["rms_norm_eps"]))
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise ValueError(f"{model_dir}: tokenizer.json has no BPE merges")
        # Qwen2.5 has no BOS: llama.cpp must not add one (the torch runtime adds none).
        special.add_special_token["bos"] = False
        special.add_special_token["eos"] = False
        if "bos" not in special.special_token_ids and text_config.get("bos_token_id") is not None:
            special.special_token_ids["bos"] = text_config["bos_token_id"]
        special.chat_template = _chat_template(model_dir)
        special.add_to_gguf(writer, quiet=True)

    return write


def _vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Token strings and types in id order, padded to the embedding rows as llama.cpp expects.

    Typed as llama.cpp's `convert_hf_to_gguf.py` types them: added tokens marked special, or shaped like
    control tokens (`_looks_like_control`), are CONTROL; the other added ones (e.g. `<tool_call>`)
    USER_DEFINED, which llama.cpp matches in plain text as the Hugging Face tokenizer does. Qwen2.5's
    `<|fim_prefix|>`…`<|file_sep|>` (151659-151664) are added non-special: typed USER_DEFINED, llama.cpp
    warns about each on every load.
    """
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer["model"]
    if model.get("type") != "BPE" or tokenizer.get("decoder", {}).get("type") != "ByteLevel":
        raise ValueError(f"{model_dir}: not a byte-level BPE tokenizer (Qwen2.5's): {model.get('type')}")
    by_id: dict[int, tuple[str, int]] = {i: (text, gguf.TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        control = added.get("special") or _looks_like_control(added["content"])
        kind = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer id {max(by_id)} does not fit the {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text.encode("utf-8"))
        types.append(int(kind))
    return tokens, types


def _looks_like_control(text: str) -> bool:
    """llama.cpp's rule for added tokens that ought to be control tokens though not marked special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _normalizer(model_dir: Path) -> str | None:
    """The tokenizer's Unicode normalisation. llama.cpp's qwen2 tokenizer applies none, so the runtime
    applies it (Qwen2.5: NFC) before tokenizing; any other normaliser would tokenize differently."""
    normalizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer")
    kind = normalizer.get("type") if normalizer else None
    if kind not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise ValueError(f"{model_dir}: tokenizer normaliser {normalizer} has no llama.cpp equivalent")
    return kind


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file() and (template := json.loads(path.read_text(encoding="utf-8")).get("chat_template")):
            return template
    return None


def _vision_metadata(config: dict[str, Any], model_dir: Path, name: str, dtype: str) -> Callable[[Any], None]:
    import gguf

    vision = config["vision_config"]
    full = list(vision.get("fullatt_block_indexes") or [])
    period = full[0] + 1 if full else 0
    if full and full != list(range(period - 1, vision["depth"], period)):
        raise ValueError(f"full-attention blocks {full} are not periodic; llama.cpp's n_wa_pattern cannot express them")
    if period == 1:  # clip.cpp then builds no window mask but sets one, and aborts the process
        raise ValueError(f"every vision block is full attention (fullatt_block_indexes {full}): llama.cpp's Qwen2.5-VL "
                         "projector needs windowed blocks between them")
    # What llama.cpp's converter writes for Qwen2.5-VL, no more: clip.cpp fixes the merge (2) and the
    # attention window (112 pixels) for this projector and reads no pixel limits from the file (the
    # runtime passes the judge's limits, from dfj.json, as image token bounds).
    for key, fixed in (("spatial_merge_size", 2), ("window_size", 112)):
        if vision.get(key, fixed) != fixed:
            raise ValueError(f"vision {key} {vision[key]}: llama.cpp's Qwen2.5-VL projector fixes it at {fixed}")
    processor = _processor_config(model_dir)
    if vision.get("hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"vision activation {vision.get('hidden_act')!r} has no llama.cpp equivalent")

    def write(writer) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name + " (vision)")
        writer.add_file_type(LLAMA_FTYPES[dtype])
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
        writer.add_vision_image_size(WARMUP_IMAGE_SIZE)
        writer.add_vision_patch_size(vision["patch_size"])
        writer.add_vision_embedding_length(vision["hidden_size"])
        writer.add_vision_feed_forward_length(vision["intermediate_size"])
        writer.add_vision_block_count(vision["depth"])
        writer.add_vision_head_count(vision["num_heads"])
        writer.add_vision_projection_dim(vision["out_hidden_size"])
        writer.add_vision_attention_layernorm_eps(1e-6)  # Qwen2.5-VL's RMSNorm eps (not in its config)
        writer.add_vision_image_mean(list(processor["image_mean"]))
        writer.add_vision_image_std(list(processor["image_std"]))
        writer.add_vision_n_wa_pattern(period)
        writer.add_bool(gguf.Keys.ClipVision.USE_SILU if vision.get("hidden_act", "silu") == "silu" else gguf.Keys.ClipVision.USE_GELU, True)

    return write


def _processor_config(model_dir: Path) -> dict[str, Any]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("image_processor", data)
            if "image_mean" in data:
                return data
    raise ValueError(f"{model_dir}: no image processor config with image_mean/image_std")


def write_gguf(model_dir: Path, folder: Path, *, quant: str, name: str,
               mmproj_dtype: str | None = None) -> dict[str, Any]:
    """Write `model.gguf` (quantized as asked) and `mmproj.gguf` from a merged checkpoint folder."""
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}: {', '.join(QUANTS)}")
    mmproj_dtype = mmproj_dtype or ("f32" if quant == "f32" else "f16")
    if mmproj_dtype not in ("f32", "f16"):
        raise ValueError(f"mmproj dtype must be f32 or f16, not {mmproj_dtype!r}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    normalizer = _normalizer(model_dir)
    shapes, read = _reader(model_dir)
    text, vision = plan_tensors(shapes, config)
    _write(folder / GGUF_TEXT_FILE, "qwen2vl", _text_metadata(config, model_dir, name, quant), text, read, quant)
    _write(folder / GGUF_MMPROJ_FILE, "clip", _vision_metadata(config, model_dir, name, mmproj_dtype), vision, read,
           mmproj_dtype)
    return {"quant": quant, "mmproj_dtype": mmproj_dtype, "normalizer": normalizer, "text_tensors": len(text), "vision_tensors": len(vision),
            "bytes": {GGUF_TEXT_FILE: (folder / GGUF_TEXT_FILE).stat().st_size, GGUF_MMPROJ_FILE: (folder / GGUF_MMPROJ_FILE).stat().st_size},
            "writer": "gguf " + package_version("gguf")}


def export_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quant: str = "f16",
    mode: str | None = None,
    overwrite: bool = False,
    limits: PixelLimits | None = None,
    mmproj_dtype: str | None = None,
    probe_memory: int | None = None,
) -> Path:
    """Merge the LoRA if needed, write the two GGUF files, check the probe through llama.cpp, write."""
    from dfj.export.lora_merge import merged_scratch
    from dfj.sources import export_manifest, resolve

    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}: {', '.join(QUANTS)}")
    resolved = resolve(source, mode=mode)
    limits = limits or resolved.limits
    # A merged model is read as it is; an adapter is merged (streamed, float32) into a scratch folder first.
    ready = contextlib.nullcontext(resolved.path) if resolved.kind == "model" else merged_scratch(source, out, mode=mode, limits=limits, probe_memory=probe_memory)
    with ready as merged:
        with staged_folder(out, overwrite=overwrite) as work:
            info = write_gguf(merged, work, quant=quant, name=resolved.name, mmproj_dtype=mmproj_dtype)
            exact = quant == "f32" and info["mmproj_dtype"] == "f32"
            # The f32 gate needs an fp32 reference; an f16 file is measured against the checkpoint as
            # saved (a bf16 judge streamed as bf16, not copied to disk at twice its size as fp32).
            reference_dtype = "float32" if quant == "f32" else hf.checkpoint_dtype(merged)
            parity = probe_parity(merged, work, resolved.mode, limits, info["normalizer"], probe_memory, reference_dtype)
            gates = tolerances.EXPORT  # the f32 file against transformers fp32
            parity.update(tolerance=gates.gguf_f32_max_abs if exact else None,
                          min_cosine=gates.gguf_f32_min_cosine if exact else None)
            if exact and (parity["max_abs_diff"] > gates.gguf_f32_max_abs or parity["cosine"] < gates.gguf_f32_min_cosine):
                raise RuntimeError(f"the f32 GGUF does not match transformers: {parity}")
            write_manifest(
                work,
                export_manifest(resolved, "gguf", adapter_record(resolved),
                                limits=limits, quant=f"gguf-{quant}", parity=parity, extra={"gguf": info}),
            )
    return Path(out).resolve()


def probe_parity(merged: Path, folder: Path, mode: str, limits: PixelLimits, normalizer: str | None,
                 memory: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Probe logits of the GGUF files (through llama.cpp) against transformers on the merged model, in
    `dtype` (its layers streamed from disk when it is bigger than the probe's memory budget)."""
    from dfj.artifact.probe import as_logprobs, bounded_probe_logits, compare_logits, gguf_probe_logits

    processor = hf.load_processor(merged)
    processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    reference = as_logprobs(bounded_probe_logits(merged, processor, mode, dtype, **({} if memory is None else {"memory": memory})))
    parity = compare_logits(reference, gguf_probe_logits(folder, mode, limits, normalizer, len(reference)))
    return {**parity, "reference": f"transformers {dtype} (merged)"}


