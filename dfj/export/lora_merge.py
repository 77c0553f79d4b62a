"""LoRA merge: base + adapter -> a standalone Qwen2.5-VL safetensors judge with a dfj manifest.

The merge streams: each base tensor is read from the memory-mapped shards, the LoRA delta of the
modules the adapter targets is added (W + scale * B @ A, in float32, then cast to the saved dtype) and
the result is appended to the output shards, so peak memory is one tensor, not the model. Every
adapter tensor must find its base weight and every LoRA A its B; an adapter feature the merge does
not implement (DoRA, LoRA biases, embedding LoRA, modules_to_save) is refused by name.

The merged model is then checked against the unmerged base + adapter on a probe judge call, both run
within a memory budget (layers past it stay on disk: `hf.load_model(max_memory=...)`); the result is
recorded in the manifest, and a float32 merge that misses the tolerance is an error (nothing is left
at the output path).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dfj import hf, tolerances
from dfj.artifact.checkpoint import Checkpoint, PlannedTensor, torch_dtype_code, write_shards
from dfj.tensor_names import canonical_key
from dfj.artifact.probe import PROBE_MEMORY_BYTES, bounded_probe_logits, compare_logits, lossless_tolerance
from dfj.artifact.staging import staged_folder
from dfj.images import PixelLimits
from dfj.manifest import ArtifactError, sha256_file, write_manifest
from dfj.sources import export_manifest, resolve

# The dtypes whose merge is lossless and gated on max |delta logit| (`dfj.tolerances`); bf16 is lossy
# and gated by cosine only.
LOSSLESS_DTYPES = ("float32",)
# Memory the parity probe may hold in weights; the layers past it are read from disk as the forward
# reaches them. 2 GB holds a 7B judge's vision tower in bf16 and leaves the export under 4 GB.
# Files of a model folder besides its weights that the artifact carries (the processor is re-saved).
_MODEL_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class LoraDelta:
    """The LoRA of one base weight: its A and B tensors in the adapter file and the scale."""

    module: str  # the module's name in the adapter (peft's name for it)
    a_key: str
    b_key: str
    scale: float


def lora_deltas(adapter_dir: Path, base: Checkpoint) -> dict[str, LoraDelta]:
    """{base checkpoint key: its LoRA}; refuses adapters the merge cannot reproduce exactly."""
    from safetensors import safe_open

    weights = adapter_dir / hf.ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{adapter_dir}: no {hf.ADAPTER_WEIGHTS} (pickled adapter_model.bin is never loaded)")
    config = hf.read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise ArtifactError(f"{adapter_dir}: only LoRA adapters are supported, not {config.get('peft_type')}")
    unsupported = [name for name in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layer_replication")
                   if config.get(name)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise ArtifactError(f"{adapter_dir}: the merge does not implement adapter_config {', '.join(unsupported)}")
    from peft.utils.other import get_pattern_key

    by_canonical = {canonical_key(key): key for key in base.keys()}
    with safe_open(weights, "pt") as handle:
        keys = list(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        match = pattern.match(key)
        if match is None:
            raise ArtifactError(f"{adapter_dir}: adapter tensor {key} is not a LoRA A/B weight of a linear layer")
        modules.setdefault(match.group(1), {})[match.group(2)] = key
    deltas: dict[str, LoraDelta] = {}
    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            raise ArtifactError(f"{adapter_dir}: {module} has a LoRA {'A' if 'A' in pair else 'B'} without its partner")
        base_key = by_canonical.get(canonical_key(module + ".weight"))
        if base_key is None:
            raise ArtifactError(f"{adapter_dir}: adapter tensor {pair['A']} targets {module}, which the base checkpoint lacks")
        rank = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}).keys(), module), config["r"])
        alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}).keys(), module),
                                                    config["lora_alpha"])
        a_shape, b_shape, w_shape = shapes[pair["A"]], shapes[pair["B"]], base.shapes[base_key]
        if a_shape[0] != rank or b_shape[1] != rank or (b_shape[0], a_shape[1]) != tuple(w_shape):
            raise ArtifactError(f"{adapter_dir}: {module}: LoRA shapes A{a_shape} B{b_shape} (rank {rank}) do not fit "
                                f"the base weight {tuple(w_shape)}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[base_key] = LoraDelta(module, pair["A"], pair["B"], scale)
    if not deltas:
        raise ArtifactError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return deltas


def _adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / hf.ADAPTER_WEIGHTS)  # small: rank x width per module
    if all(float(t.abs().max()) == 0.0 for k, t in tensors.items() if ".lora_B." in k):
        raise ArtifactError(f"{adapter_dir}: the adapter changes nothing (every LoRA B matrix is zero)")
    return tensors


def stream_merge(model_dir: Path, adapter_dir: Path | None, work: Path, saved_dtype: str,
                 max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write `model_dir`'s weights (+ the adapter's LoRA deltas) as `saved_dtype` shards into `work`."""
    base = Checkpoint(model_dir)
    deltas = lora_deltas(adapter_dir, base) if adapter_dir is not None else {}
    adapter = _adapter_tensors(adapter_dir) if adapter_dir is not None else {}
    target = hf.torch_dtype(saved_dtype, "cpu")
    code = torch_dtype_code(target)

    def produce(key: str):
        tensor = base.read(key)
        if not tensor.is_floating_point():
            return tensor
        delta = deltas.get(key)
        if delta is None:
            return tensor.to(target)
        merged = tensor.float().addmm_(adapter[delta.b_key].float(), adapter[delta.a_key].float(), alpha=delta.scale)
        return merged.to(target)

    plan = [PlannedTensor(key, base.shapes[key], code if _is_float(base.dtypes[key]) else base.dtypes[key])
            for key in base.keys()]
    files = write_shards(work, plan, produce, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    return {"files": files, "merged_modules": len(deltas)}


def _is_float(code: str) -> bool:
    return code in ("F32", "F16", "BF16", "F64")


def _write_config(model_dir: Path, work: Path, saved_dtype: str) -> None:
    for name in _MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, work / name)
    config = json.loads((work / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = saved_dtype
    for nested in ("text_config", "vision_config"):
        if isinstance(config.get(nested), dict) and "dtype" in config[nested]:
            config[nested]["dtype"] = saved_dtype
    config.pop("torch_dtype", None)
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def lora_hooks(model, adapter_dir: Path, deltas: dict[str, LoraDelta]) -> Iterator[None]:
    """Run `model` as base + adapter without merging: each targeted linear layer adds
    scale * (x A^T) B^T to its output, as peft's unmerged forward does. peft itself cannot wrap a
    model whose layers are offloaded to disk (measured: KeyError in `PeftModel._update_offload` on a
    hub-layout checkpoint), and the reference must run within the probe's memory budget."""
    tensors = _adapter_tensors(adapter_dir)
    by_canonical = {canonical_key(key): delta for key, delta in deltas.items()}
    handles = []
    for name, module in model.named_modules():
        delta = by_canonical.get(canonical_key(name + ".weight"))
        if delta is None:
            continue
        a, b = tensors[delta.a_key], tensors[delta.b_key]

        def add_lora(module, inputs, output, a=a, b=b, scale=delta.scale):
            x = inputs[0]
            return output + ((x.to(a.dtype) @ a.T) @ b.T * scale).to(output.dtype)

        handles.append(module.register_forward_hook(add_lora))
    try:
        if len(handles) != len(deltas):
            raise ArtifactError(f"{adapter_dir}: {len(deltas)} LoRA modules but {len(handles)} matching layers in the model")
        yield
    finally:
        for handle in handles:
            handle.remove()


def adapter_probe_logits(model_dir: Path, adapter_dir: Path | None, processor, mode: str, dtype: str, *,
                         memory: int = PROBE_MEMORY_BYTES):
    """Probe logits of the base in `model_dir` with the adapter applied unmerged (`lora_hooks`), within
    the probe's memory budget; the base alone without an adapter."""
    if adapter_dir is None:
        return bounded_probe_logits(model_dir, processor, mode, dtype, memory=memory)
    return bounded_probe_logits(model_dir, processor, mode, dtype, memory=memory, hooks=lambda model, checkpoint: lora_hooks(
        model, adapter_dir, lora_deltas(adapter_dir, checkpoint)))


def adapter_record(resolved) -> dict[str, Any]:
    """What a manifest records of the adapter an artifact was merged from (empty for a model)."""
    if resolved.kind != "adapter":
        return {}
    return {
        "adapter": str(resolved.path),
        "adapter_layout": hf.adapter_key_layout(resolved.path),
        "adapter_sha256": sha256_file(resolved.path / hf.ADAPTER_WEIGHTS),
        "base": str(resolved.base),
    }


def export_merged(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    limits: PixelLimits | None = None,
    check: bool = True,
    probe_memory: int = PROBE_MEMORY_BYTES,
) -> Path:
    """Write the merged judge to `out` (atomically) and return its path."""
    resolved = resolve(source, mode=mode)
    model_dir = resolved.base if resolved.kind == "adapter" else resolved.path
    adapter_dir = resolved.path if resolved.kind == "adapter" else None
    saved_dtype = hf.checkpoint_dtype(model_dir) if dtype == "auto" else str(hf.torch_dtype(dtype, "cpu")).removeprefix("torch.")
    limits = limits or resolved.limits
    processor = hf.load_processor(model_dir)
    processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    with staged_folder(out, overwrite=overwrite) as work:
        merge_info = stream_merge(model_dir, adapter_dir, work, saved_dtype)  # checks the adapter first
        adapter_info = adapter_record(resolved)
        _write_config(model_dir, work, saved_dtype)
        processor.save_pretrained(work)
        parity: dict[str, Any] = {}
        if check:
            reference = adapter_probe_logits(model_dir, adapter_dir, processor, resolved.mode, saved_dtype, memory=probe_memory)
            merged = bounded_probe_logits(work, processor, resolved.mode, saved_dtype, memory=probe_memory)
            parity = compare_logits(reference, merged)
            tolerance = lossless_tolerance(reference) if saved_dtype in LOSSLESS_DTYPES else None
            min_cosine = tolerances.EXPORT.merge_min_cosine
            parity.update(reference="base+adapter" if adapter_info else "source", tolerance=tolerance, min_cosine=min_cosine)
            if (tolerance is not None and parity["max_abs_diff"] > tolerance) or parity["cosine"] < min_cosine:
                raise RuntimeError(f"merged model does not match its source: {parity}")
        write_manifest(
            work,
            export_manifest(
                resolved, "safetensors", {"dtype": saved_dtype, **adapter_info},
                limits=limits, quant="none", parity=parity,
                extra={"merge": {"streamed": True, "dtype": saved_dtype, **merge_info}},
            ),
        )
    return Path(out).resolve()


@contextlib.contextmanager
def merged_scratch(source: str | os.PathLike, out: str | os.PathLike, *, mode: str | None = None,
                   limits: PixelLimits | None = None, probe_memory: int | None = None) -> Iterator[Path]:
    """The float32 merge of `source` in a hidden scratch folder beside `out` (same disk), removed after:
    the starting point of a GGUF export from an adapter."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merge-") as scratch:
        yield export_merged(source, Path(scratch) / "merged", mode=mode, dtype="float32", limits=limits,
                            **({} if probe_memory is None else {"probe_memory": probe_memory}))
