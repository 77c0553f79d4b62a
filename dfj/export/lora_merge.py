"""LoRA merge: base + adapter -> a standalone Qwen2.5-VL safetensors judge with a dfj manifest.

The merged model is reloaded from disk and checked against the unmerged base+adapter on a probe
judge call; the result is recorded in the manifest, and a float32 merge that misses the tolerance is
an error (nothing is left at the output path).
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dfj import hf
from dfj.export.probe import LOSSLESS_ATOL, LOSSLESS_RTOL, compare_logits, lossless_tolerance, probe_logits
from dfj.export.staging import staged_folder
from dfj.images import PixelLimits
from dfj.manifest import Manifest, sha256_file, write_manifest
from dfj.sources import resolve

# (atol, rtol) of the max |logit difference| allowed between the merged artifact and base+adapter, by
# saved dtype (see `probe.lossless_tolerance`); bf16 is lossy and checked by cosine only.
MERGE_TOLERANCE = {"float32": (LOSSLESS_ATOL, LOSSLESS_RTOL)}
MIN_COSINE = 0.999  # any dtype


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
    **_: Any,
) -> Path:
    """Write the merged judge to `out` (atomically) and return its path."""
    from transformers import AutoProcessor

    resolved = resolve(source, mode=mode)
    model_dir = resolved.base if resolved.kind == "adapter" else resolved.path
    saved_dtype = hf.checkpoint_dtype(model_dir) if dtype == "auto" else str(hf.torch_dtype(dtype, "cpu")).removeprefix("torch.")
    limits = limits or resolved.limits
    with hf.quiet_transformers():
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        model = hf.load_model(model_dir, dtype=hf.torch_dtype(saved_dtype, "cpu"))
        if resolved.kind == "adapter":
            peft_model = hf.apply_adapter(model, resolved.path)  # refuses pickles and partial adapters first
            reference = probe_logits(peft_model, processor, resolved.mode) if check else None
            model = peft_model.merge_and_unload()
        else:
            reference = probe_logits(model, processor, resolved.mode) if check else None
        adapter_info = adapter_record(resolved)

        with staged_folder(out, overwrite=overwrite) as work:
            model.save_pretrained(work)
            del model
            gc.collect()
            processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
            processor.save_pretrained(work)
            parity: dict[str, Any] = {}
            if check:
                reloaded = hf.load_model(work, dtype=hf.torch_dtype(saved_dtype, "cpu"))
                parity = compare_logits(reference, probe_logits(reloaded, processor, resolved.mode))
                del reloaded
                bounds = MERGE_TOLERANCE.get(saved_dtype)
                tolerance = None if bounds is None else lossless_tolerance(reference, *bounds)
                parity.update(reference="base+adapter" if adapter_info else "source", tolerance=tolerance)
                if (tolerance is not None and parity["max_abs_diff"] > tolerance) or parity["cosine"] < MIN_COSINE:
                    raise RuntimeError(f"merged model does not match its source: {parity}")
            write_manifest(
                work,
                Manifest.for_judge(
                    resolved.mode, "safetensors",
                    {"name": resolved.name, "kind": resolved.kind, "dtype": saved_dtype, **adapter_info},
                    limits=limits, quant="none", parity=parity,
                ),
            )
    return Path(out).resolve()


@contextlib.contextmanager
def merged_scratch(source: str | os.PathLike, out: str | os.PathLike, *, mode: str | None = None,
                   limits: PixelLimits | None = None) -> Iterator[Path]:
    """The float32 merge of `source` in a hidden scratch folder beside `out` (same disk), removed after:
    the starting point of the quantizing exports."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merge-") as scratch:
        yield export_merged(source, Path(scratch) / "merged", mode=mode, dtype="float32", limits=limits)
