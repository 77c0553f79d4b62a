"""Tensor names of a Qwen2.5-VL judge: one name per checkpoint tensor whatever the layout, and the GGUF
tensor each becomes, both ways.

The export writes the text GGUF and the mmproj from this plan; the llama.cpp runtime's torch vision
tower (`dfj.runtime.llamacpp.torch_vision`) reads the mmproj back through the same plan, so the two
directions cannot drift apart. It imports no dfj module: export, quant, artifact and runtime all sit
above it. Names come from the `gguf` package's `TensorNameMap`; what llama.cpp expects and no library
does is done here: the vision qkv is split into q/k/v and the Conv3D patch embedding into its two
temporal kernels. A tensor the map does not know is an error, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np



def canonical_key(key: str) -> str:
    """One name per tensor whatever the layout: transformers 5 nests the towers under `model.`
    (`model.language_model.layers.0…`, `model.visual…`); hub checkpoints use `model.layers.0…`, `visual…`."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return key


@dataclass(frozen=True)
class GgufTensor:
    """One GGUF tensor: its name, the checkpoint key it comes from and how it is cut out of it (`take`
    returns a view of the checkpoint tensor, so the same cut also puts the GGUF tensor back)."""

    name: str
    key: str
    shape: tuple[int, ...]
    take: Callable[[np.ndarray], np.ndarray] | None = None


def plan_vision_tensors(shapes: Mapping[str, tuple[int, ...]], vision_config: Mapping[str, Any]) -> list[GgufTensor]:
    """The mmproj tensors of the `visual.*` keys in {key: shape} (other keys are ignored)."""
    import gguf

    # The projector's linears (merger.mlp.0 / .2 -> mm.0 / mm.2) are named through the block-indexed
    # map, so it must cover index 2 even for a vision tower of fewer than three blocks.
    vision_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vision_config["depth"], 3))
    vision: list[GgufTensor] = []
    unknown: list[str] = []
    for key in sorted(shapes):
        name_key, shape = canonical_key(key), tuple(shapes[key])
        if not name_key.startswith("visual."):
            continue
        name = vision_map.get_name(name_key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
        elif name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
            third = shape[0] // 3
            for index, part in enumerate("qkv"):
                vision.append(GgufTensor(name.replace("attn_qkv", f"attn_{part}"), key, (third, *shape[1:]),
                                         lambda a, i=index, n=third: a[i * n:(i + 1) * n]))
        elif name == "v.patch_embd.weight":
            if len(shape) != 5 or shape[2] != 2:
                raise ValueError(f"{key}: expected a Conv3D kernel with temporal size 2, got shape {shape}")
            for index, suffix in enumerate(("", ".1")):  # llama.cpp runs the two temporal slices as 2-D convs
                vision.append(GgufTensor(name + suffix, key, (shape[0], shape[1], *shape[3:]),
                                         lambda a, i=index: a[:, :, i]))
        else:
            vision.append(GgufTensor(name, key, shape))
    _refuse_unknown(unknown)
    return vision


def plan_tensors(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> tuple[list[GgufTensor], list[GgufTensor]]:
    """(text tensors, vision tensors) for a Qwen2.5-VL checkpoint given its {key: shape}."""
    import gguf

    text_config = config.get("text_config", config)
    tied = bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))
    text_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, text_config["num_hidden_layers"])
    vision = plan_vision_tensors(shapes, config["vision_config"])
    text: list[GgufTensor] = []
    unknown: list[str] = []
    for key in sorted(shapes):
        name_key, shape = canonical_key(key), tuple(shapes[key])
        if name_key.startswith("visual."):
            continue
        name = text_map.get_name(name_key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(key)
        elif name == "output.weight" and tied:
            continue  # llama.cpp reads a tied head from token_embd
        else:
            text.append(GgufTensor(name, key, shape))
    _refuse_unknown(unknown)
    names = {t.name for t in text}
    missing = {"token_embd.weight", "output_norm.weight"} - names
    if not tied and "output.weight" not in names:
        missing.add("output.weight")
    if missing:
        raise ValueError(f"checkpoint lacks {', '.join(sorted(missing))}")
    return text, vision


def assemble(plan: list[GgufTensor], shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray],
             dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors of `plan`, one key at a time, put back together from the GGUF tensors that
    `read(name)` gives (each in its cut's shape): the inverse of the export's cuts. Every key is filled whole."""
    parts: dict[str, list[GgufTensor]] = {}
    for tensor in plan:
        parts.setdefault(tensor.key, []).append(tensor)
    for key, tensors in parts.items():
        whole = np.empty(shapes[key], dtype=dtype)
        filled = 0
        for tensor in tensors:
            part = whole if tensor.take is None else tensor.take(whole)
            if not np.shares_memory(part, whole):
                raise AssertionError(f"{tensor.name}: the cut of {key} is not a view; it cannot be put back")
            data = read(tensor.name)
            if tuple(data.shape) != tuple(part.shape):
                raise ValueError(f"GGUF tensor {tensor.name} has shape {tuple(data.shape)}; {key} needs {tuple(part.shape)}")
            part[...] = data
            filled += part.size
        if filled != whole.size:
            raise ValueError(f"GGUF tensors leave part of {key} unfilled")
        yield key, whole


def _refuse_unknown(unknown: list[str]) -> None:
    if unknown:
        raise ValueError(f"tensors with no GGUF name (refusing to drop them): {', '.join(unknown[:10])}"
                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
