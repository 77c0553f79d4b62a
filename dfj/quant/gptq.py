"""GPTQ 4-bit / 8-bit with DFJ image+text calibration (GPTQModel), loadable by transformers and vLLM.

From a merged artifact (`dfj export SOURCE` writes one), GPTQModel's Qwen2.5-VL definition quantizes
the language model's linear layers one layer at a time, calibrated on real judge inputs: the image, the filled
DFJ prompt in the chat layout and the gold judge output, read from a DFJ split with the dfj reader
and resized by the judge's processor at its training pixel limits. The vision tower stays dense.
Before anything is written the artifact is reloaded through transformers and checked: every
language-model linear packed, no vision weight quantized, probe logits close to the merged input's
(run with its layers streamed from disk when it is bigger than the probe's memory budget).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dfj import tolerances
from dfj.artifact.staging import staged_folder
from dfj.images import PixelLimits, load_image
from dfj.manifest import write_manifest
from dfj.quant import QuantSpec, quantized_manifest

DEFAULTS = {"bits": 4, "group_size": 128, "samples": 128, "sym": True, "desc_act": False}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# GPTQModel's own bounded-memory loading: the model is a meta-device shell whose modules are read from
# the checkpoint when the layer-by-layer loop reaches them, and finished ones go back to disk.
OFFLOAD_TO_DISK = True

NO_CALIBRATION = (
    "a gptq-* method needs --calibration SPLIT_DIR: a DFJ split (e.g. the judge's training split) whose "
    "images, prompts and gold judge outputs calibrate the quantization. Calibrating on random text would "
    "silently ruin a judge, so dfj does not offer it."
)


def calibration_conversations(split_dir: str | os.PathLike, mode: str, samples: int) -> list[list[dict[str, Any]]]:
    """The first `samples` usable records of a DFJ split as chat conversations: [image, prompt] from the
    user, the gold judge output from the assistant (when the record carries it)."""
    from dfj import prompts
    from dfj.data import read_split

    split = read_split(split_dir, mode=mode)
    if not split.records:
        raise ValueError(f"{split_dir}: no usable {mode} records for calibration"
                         + (f" ({len(split.errors)} bad lines; first: {split.errors[0]})" if split.errors else ""))
    conversations = []
    for record in split.records[:samples]:
        user = [{"type": "image", "image": load_image(record.image)},
                {"type": "text", "text": prompts.render(mode, record.label, *record.responses())}]
        turns = [{"role": "user", "content": user}]
        if record.gold_text:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": record.gold_text}]})
        conversations.append(turns)
    return conversations


def quantize_gptq(source: Path, out: Path, spec: QuantSpec, manifest, *, overwrite: bool = False) -> Path:
    """Calibrate, quantize with GPTQ, verify, and write a GPTQ checkpoint with a dfj manifest."""
    if spec.calibration is None:
        raise ValueError(NO_CALIBRATION)
    bits = int(spec.level.removesuffix("bit"))
    conversations = calibration_conversations(spec.calibration, manifest.mode, spec.samples)
    settings = {**DEFAULTS, "bits": bits, "group_size": spec.group_size, "samples": len(conversations),
                "calibration": str(spec.calibration.resolve()), "backend": "gptqmodel",
                "calibration_with_gold_output": all(len(c) == 2 for c in conversations)}
    out = Path(out)
    with staged_folder(out, overwrite=overwrite) as work, tempfile.TemporaryDirectory(dir=out.parent.resolve(), prefix=f".{out.name}.gptq-") as scratch:
        log = Path(scratch) / "gptqmodel.log"
        with _library_output_to(log):
            _quantize(source, work, conversations, bits, spec.group_size, Path(scratch))
            checks = verify_gptq(work, source, manifest.mode, PixelLimits(**manifest.pixels))
        write_manifest(work, quantized_manifest(manifest, source, "gptq", spec.method, checks.pop("parity"),
                                                {"gptq": {**settings, **checks}}))
    return out.resolve()


@contextlib.contextmanager
def _library_output_to(log: Path):
    """GPTQModel prints banners, tables and file dumps: keep them in a log, show its tail on failure."""
    with open(log, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            yield
        except Exception as exc:
            sink.flush()
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise RuntimeError(f"GPTQ quantization failed: {exc}\n--- GPTQModel output (last lines) ---\n{tail}") from exc


@contextlib.contextmanager
def _library_logs_in(folder: Path):
    """GPTQModel writes per-layer logs to ./logs of whatever the working directory is (a user's
    project, a CI checkout); point that folder into the export's scratch space while it runs."""
    from gptqmodel.looper import loop_processor

    before = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = before


def _quantize(merged: Path, work: Path, conversations: list, bits: int, group_size: int, scratch: Path) -> None:
    from dfj.hf import prepare_gptqmodel

    prepare_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # pack_impl="original" and the torch backend: no minutes of kernel compilation on a small CPU host.
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=DEFAULTS["sym"], desc_act=DEFAULTS["desc_act"],
                            pack_impl="original", offload_to_disk=OFFLOAD_TO_DISK)
    model = GPTQModel.load(str(merged), config, device="cpu")
    with _library_logs_in(scratch / "gptqmodel-logs"):
        model.quantize(conversations, batch_size=1, backend=BACKEND.TORCH)
    model.save(str(work))
    del model
    gc.collect()
    for name in ("quant_log.csv",):  # GPTQModel's per-layer log; not part of the checkpoint
        (work / name).unlink(missing_ok=True)


def verify_gptq(folder: Path, merged: Path, mode: str, limits: PixelLimits) -> dict[str, Any]:
    """Reload through transformers (pure-torch kernel) and check packing, vision density and probe logits."""
    import torch
    from safetensors import safe_open

    from dfj import hf
    from dfj.artifact.checkpoint import Checkpoint
    from dfj.artifact.probe import bounded_probe_logits, compare_logits, probe_logits

    config = json.loads((folder / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    tensors: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                tensors[key] = tuple(tensor.get_shape())
                sizes[key] = int(torch.tensor(tensor.get_shape()).prod()) * _itemsize(tensor.get_dtype())
    packed, missing = 0, []
    for layer in range(layers):
        for linear in LINEARS:
            prefix = f"model.language_model.layers.{layer}.{linear}"
            if all(f"{prefix}.{part}" in tensors for part in ("qweight", "qzeros", "scales")) and f"{prefix}.weight" not in tensors:
                packed += 1
            else:
                missing.append(prefix)
    if missing:
        raise RuntimeError(f"GPTQ artifact has {len(missing)} language-model linear layers not packed, e.g. {missing[0]}")
    quantized_vision = [k for k in tensors if ".visual." in f".{k}" and k.endswith(("qweight", "qzeros", "scales"))]
    if quantized_vision:
        raise RuntimeError(f"GPTQ quantized vision-tower weights ({quantized_vision[0]}); the tower must stay dense")
    quant_bytes = sum(v for k, v in sizes.items() if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")))
    # Saved keys may be in either layout (`model.layers.N…` or `model.language_model.layers.N…`).
    wanted = tuple(f"layers.{i}.{linear}.weight" for i in range(layers) for linear in LINEARS)
    source = Checkpoint(merged)
    dense_params = sum(source.numel(key) for key in source.keys()
                       if key.endswith(wanted) and "visual" not in key)
    processor = hf.load_processor(merged)
    processor.image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    reference = bounded_probe_logits(merged, processor, mode, "float32")
    with hf.quiet_transformers():  # its dense parts (vision, embedding, head) in the input's dtype, as saved
        quantized = hf.load_model(folder, dtype=hf.torch_dtype(hf.checkpoint_dtype(merged), "cpu"))
    parity = compare_logits(reference, probe_logits(quantized, processor, mode))
    min_cosine = tolerances.EXPORT.gptq_min_cosine  # a judge quantized below it is refused
    parity.update(reference="transformers fp32 (merged input)", min_cosine=min_cosine)
    del quantized
    gc.collect()
    if parity["cosine"] < min_cosine:
        raise RuntimeError(f"the GPTQ judge's probe logits drifted too far from the fp32 merge: {parity}")
    # Against the bf16 checkpoint a user would otherwise ship (the DFJ judges are bf16).
    return {"parity": parity, "packed_linear_layers": packed, "linear_weight_bytes": quant_bytes,
            "bf16_linear_weight_bytes": 2 * dense_params, "linear_compression_vs_bf16": 2 * dense_params / max(quant_bytes, 1)}


def _itemsize(dtype: str) -> int:
    table = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "I16": 2, "BOOL": 1}
    return table.get(dtype, 4)
