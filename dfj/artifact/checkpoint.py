"""Safetensors checkpoints one tensor at a time: a lazy reader over a model folder's shards and a
writer that streams tensors into shards, so that no export holds a whole model in memory.

safetensors has no incremental writer (`save_file` takes every tensor of a file at once), so the
writer lays out the header from the planned shapes and dtypes first, then appends each tensor's bytes
as it is produced: peak memory is the largest tensor, whatever the number of layers.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Shards of at most 2 GB: the size transformers used for years, small enough for any file system.
MAX_SHARD_BYTES = 2 * 1024**3

_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
           "BOOL": ("bool", 1)}
_BY_TORCH_NAME = {name: code for code, (name, _) in _DTYPES.items()}


def return_freed_tensors_to_the_system() -> None:
    """Give every tensor-sized allocation its own memory mapping, returned to the system when freed.

    glibc raises its mmap threshold after each large free (up to 32 MB), so layer-sized tensors then
    come from the heap, whose freed space it keeps: a stage that handles one layer at a time still
    grows with depth (measured: +150 MB over six 61 MB layers). A fixed threshold also stops that
    adjustment. No effect off glibc.
    """
    import ctypes
    import ctypes.util

    global _THRESHOLD_FIXED
    if _THRESHOLD_FIXED:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass
    _THRESHOLD_FIXED = True


_M_MMAP_THRESHOLD = -3  # malloc.h
_THRESHOLD_FIXED = False


def itemsize(code: str) -> int:
    return _DTYPES[code][1]


def torch_dtype_code(dtype) -> str:
    """'F32' for torch.float32, and so on."""
    return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


class Checkpoint:
    """The tensors of a model folder (one `model.safetensors` or an index and its shards), read lazily."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        return_freed_tensors_to_the_system()
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} (pickle checkpoints are never read)")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            with safe_open(self.folder / name, "pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    self.where[key] = self.folder / name
                    self.shapes[key] = tuple(view.get_shape())
                    self.dtypes[key] = view.get_dtype()

    def keys(self) -> list[str]:
        return sorted(self.where)

    def read(self, key: str):
        """One tensor as torch (bf16 stays bf16; numpy has no bf16)."""
        from safetensors import safe_open

        with safe_open(self.where[key], "pt") as handle:
            return handle.get_tensor(key)

    def numel(self, key: str) -> int:
        count = 1
        for size in self.shapes[key]:
            count *= size
        return count

    def nbytes(self, key: str) -> int:
        return self.numel(key) * itemsize(self.dtypes[key])


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * itemsize(self.dtype)


def shard_plan(tensors: Iterable[PlannedTensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[PlannedTensor]]:
    """Tensors in key order, cut into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in sorted(tensors, key=lambda t: t.key):
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_shards(folder: Path, tensors: list[PlannedTensor], produce: Callable[[str], object],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` into safetensors shards in `folder`, asking `produce(key)` for each in turn.

    A produced tensor whose shape or dtype differs from its plan is an error (the header is already
    written). Returns the file names written (with an index file when there is more than one).
    """
    shards = shard_plan(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, produce)
        weight_map.update({t.key: name for t in shard})
    if len(names) > 1:
        total = sum(t.nbytes for t in tensors)
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return names


def _write_shard(path: Path, shard: list[PlannedTensor], produce: Callable[[str], object]) -> None:
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        header[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in shard:
            data = produce(tensor.key)
            if tuple(data.shape) != tensor.shape or torch_dtype_code(data.dtype) != tensor.dtype:
                raise ValueError(f"{tensor.key}: produced {tuple(data.shape)} {data.dtype}, planned {tensor.shape} {tensor.dtype}")
            handle.write(data.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
            del data
