"""ONNX export: the judge as three graphs (vision encoder, token embedding, decoder with KV cache).

The split is the onnx-community / onnxruntime-genai one. Every data-dependent step of the
Qwen2.5-VL vision tower (window order, rotary positions, attention segments) is computed on the host
by transformers' own helpers and fed in as inputs, so one graph takes any image size; the decoder
takes 3-row M-RoPE positions and past key/values, and computes logits only at the positions asked
for (the full-vocabulary head on every prompt position would cost as much as the layers).

The graph modules below call the checkpoint's own submodules (norms, projections, rotary tables,
merger); only the attention plumbing that transformers writes with Python loops over segment
lengths is expressed with masks instead. Export is checked against transformers on a probe judge
call before anything is written.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfj import hf
from dfj.export.lora_merge import adapter_record
from dfj.artifact.onnx_files import save_graph
from dfj.artifact.staging import staged_folder
from dfj.layout import ONNX_GRAPH_FILES
from dfj.images import PixelLimits
from dfj.manifest import Manifest, write_manifest
from dfj.sources import export_manifest, resolve

OPSET = 18
QUANTS = ("fp32",)  # int8 / int4 decoders are a stage of their own: `dfj.quant.onnx`


class VisionGraph(nn.Module):
    """pixel patches + host-computed indices -> merged image embeddings (one row per image token)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.unit = visual.spatial_merge_unit
        self.full = set(visual.fullatt_block_indexes)

    def forward(self, pixel_values, position_ids, window_index, reverse_index, window_segments, full_segments):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        seq = hidden.shape[0]

        def window_order(x):
            return x.reshape(seq // self.unit, self.unit, -1)[window_index].reshape(seq, -1)

        hidden = window_order(hidden)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        cos, sin = window_order(cos), window_order(sin)
        window_mask = (window_segments[:, None] == window_segments[None, :])[None, None]
        full_mask = (full_segments[:, None] == full_segments[None, :])[None, None]
        for index, block in enumerate(visual.blocks):
            attn = block.attn
            x = block.norm1(hidden)
            q, k, v = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            mask = full_mask if index in self.full else window_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.proj(out.transpose(1, 2).reshape(seq, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)[reverse_index]


class EmbedGraph(nn.Module):
    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """inputs_embeds + mask + 3-row positions + past KV -> logits at `logits_index` + present KV."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        config = self.lm.config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, *past):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

        batch, length, _ = inputs_embeds.shape
        past_length = past[0].shape[2]
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)
        key_positions = torch.arange(past_length + length, device=inputs_embeds.device)
        query_positions = torch.arange(length, device=inputs_embeds.device) + past_length
        causal = key_positions[None, :] <= query_positions[:, None]
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        hidden = inputs_embeds
        presents = []
        for index, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * index], k], dim=2)
            v = torch.cat([past[2 * index + 1], v], dim=2)
            presents += [k, v]
            out = F.scaled_dot_product_attention(q, repeat_kv(k, self.groups), repeat_kv(v, self.groups),
                                                 attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = self.lm.norm(hidden)
        return (self.head(hidden[:, logits_index]), *presents)


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", "logits_index", *past], ["logits", *present]


VISION_INPUTS = ["pixel_values", "position_ids", "window_index", "reverse_index", "window_segments", "full_segments"]


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                  dynamic: dict[str, dict[int, str]], external: bool | None) -> None:
    import tempfile
    import warnings

    import onnx

    # Export into a private folder (the exporter may spill one file per tensor), then save as one
    # graph file, plus one data file when large.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        save_graph(onnx.load(str(raw)), path, external)


def export_graphs(model: nn.Module, processor: Any, folder: Path, external: bool | None = None) -> dict[str, Any]:
    """Write the three fp32 graphs for `model` into `folder`; return their I/O description."""
    from dfj.runtime.onnx import vision_inputs

    from dfj.artifact.probe import probe_image

    model = model.float().eval()
    config = model.config
    text = config.get_text_config()
    layers = text.num_hidden_layers
    kv_heads = text.num_key_value_heads
    head_dim = text.hidden_size // text.num_attention_heads

    image = processor.image_processor(images=[probe_image()], return_tensors="pt")
    vision = vision_inputs(image["pixel_values"], image["image_grid_thw"], config.vision_config)
    with torch.no_grad():
        _export_graph(VisionGraph(model.model.visual), tuple(vision[name] for name in VISION_INPUTS),
                      folder / ONNX_GRAPH_FILES["vision"], VISION_INPUTS, ["image_embeds"],
                      {"pixel_values": {0: "patches"}, "position_ids": {0: "patches"}, "window_index": {0: "tokens"},
                       "reverse_index": {0: "tokens"}, "window_segments": {0: "patches"},
                       "full_segments": {0: "patches"}, "image_embeds": {0: "tokens"}}, external)
        ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
        _export_graph(EmbedGraph(model.model.language_model.embed_tokens), (ids,), folder / ONNX_GRAPH_FILES["embed"],
                      ["input_ids"], ["inputs_embeds"],
                      {"input_ids": {0: "batch", 1: "length"}, "inputs_embeds": {0: "batch", 1: "length"}}, external)
        # Trace with past length >= 2 and length > 1 so no dimension is specialised to 0 or 1.
        batch, past_length, length = 1, 3, 4
        embeds = torch.randn(batch, length, text.hidden_size)
        mask = torch.ones(batch, past_length + length, dtype=torch.long)
        positions = torch.arange(past_length, past_length + length).view(1, 1, -1).expand(3, batch, -1).contiguous()
        logits_index = torch.tensor([length - 2, length - 1], dtype=torch.long)
        past = [torch.randn(batch, kv_heads, past_length, head_dim) for _ in range(2 * layers)]
        inputs, outputs = decoder_io(layers)
        dynamic = {"inputs_embeds": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "total"},
                   "position_ids": {1: "batch", 2: "length"}, "logits_index": {0: "kept"}, "logits": {0: "batch", 1: "kept"}}
        dynamic.update({name: {0: "batch", 2: "past"} for name in inputs[4:]})
        dynamic.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
        _export_graph(DecoderGraph(model), (embeds, mask, positions, logits_index, *past), folder / ONNX_GRAPH_FILES["decoder"],
                      inputs, outputs, dynamic, external)
    return {"graphs": dict(ONNX_GRAPH_FILES), "opset": OPSET, "num_layers": layers, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
            "decoder_inputs": inputs, "decoder_outputs": outputs, "vision_inputs": VISION_INPUTS}


def export_onnx(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quant: str = "fp32",
    mode: str | None = None,
    overwrite: bool = False,
    limits: PixelLimits | None = None,
    external_data: bool | None = None,
) -> Path:
    """Merge the LoRA if needed, export the three fp32 graphs, check them against transformers, write.

    `external_data`: keep weights in `<graph>.onnx.data` files (default: only graphs over 1.8 GB).
    """
    from dfj.artifact.probe import compare_logits, lossless_tolerance, onnx_probe_logits

    if quant not in QUANTS:
        raise ValueError(f"unknown ONNX quantization {quant!r}: {', '.join(QUANTS)}")
    resolved = resolve(source, mode=mode)
    model_dir = resolved.base if resolved.kind == "adapter" else resolved.path
    limits = limits or resolved.limits
    with hf.quiet_transformers():
        processor = hf.load_processor(model_dir)
        model = hf.load_model(model_dir, dtype=torch.float32)
        if resolved.kind == "adapter":
            model = hf.apply_adapter(model, resolved.path).merge_and_unload()
    processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    with staged_folder(out, overwrite=overwrite) as work:
        onnx_info = export_graphs(model, processor, work, external_data)
        reference = _probe_reference(model, processor, resolved.mode)
        del model
        gc.collect()
        onnx_info["quantization"] = {"method": "none"}
        _copy_config(model_dir, work)
        processor.save_pretrained(work)
        layout = Manifest.for_judge(resolved.mode, "onnx", {}, limits=limits, extra={"onnx": onnx_info})
        parity = compare_logits(reference, onnx_probe_logits(work, layout))
        tolerance = lossless_tolerance(reference)
        parity.update(reference="transformers fp32 (merged)", tolerance=tolerance)
        if parity["max_abs_diff"] > tolerance:
            raise RuntimeError(f"the fp32 ONNX graphs do not match transformers: {parity}")
        write_manifest(
            work,
            export_manifest(resolved, "onnx", adapter_record(resolved),
                            limits=limits, quant=f"onnx-{quant}", parity=parity, extra={"onnx": onnx_info}),
        )
    return Path(out).resolve()


def _copy_config(model_dir: Path, work: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, work / name)


def _probe_reference(model, processor, mode: str):
    from dfj.artifact.probe import as_logprobs, probe_logits

    return as_logprobs(probe_logits(model, processor, mode))


