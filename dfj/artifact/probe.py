"""A fixed judge input for checking an exported model against its source, logit for logit.

The probe is a real judge call (synthetic image, filled DFJ prompt, chat template) followed by a short
judge-style continuation, so it exercises the vision tower, M-RoPE positions and the head.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dfj import prompts

PROBE_CONTINUATION = {
    "pointwise": "<reasoning>The response names the right class and grounds it.</reasoning>\n<score>4</score>",
    "pairwise": "<answer>A</answer>",
}


def probe_image(width: int = 84, height: int = 112) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], axis=-1)
    return Image.fromarray(rgb.astype("uint8"), "RGB")


def probe_chat(mode: str) -> str:
    response = "<reasoning>Blurred hairline and warped background lines.</reasoning> <answer>fake</answer>"
    responses = (response,) if mode == "pointwise" else (response, "<reasoning>Looks fine.</reasoning> <answer>real</answer>")
    return prompts.render_chat(prompts.render(mode, "fake", *responses)) + PROBE_CONTINUATION[mode]


def probe_logits(model, processor, mode: str, positions: int = 24):
    """Logits (float32, CPU) at the last `positions` positions of the probe, for the given HF model."""
    import torch

    inputs = processor(text=[probe_chat(mode)], images=[probe_image()], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        return model(**inputs, logits_to_keep=positions, use_cache=False).logits[0].float().cpu()


def lossless_tolerance(reference) -> float:
    """The max |delta logit| a lossless export of the model that gave `reference` may show
    (`dfj.tolerances.EXPORT`: atol + rtol * max |reference logit|)."""
    from dfj import tolerances

    return tolerances.EXPORT.lossless_atol + tolerances.EXPORT.lossless_rtol * float(reference.abs().max())


def compare_logits(reference, candidate) -> dict[str, float]:
    """Max |delta|, cosine and top-1 agreement of two (positions, vocab) logit or log-probability
    matrices (both of one kind). The cosine is of rows centred on their mean, which a softmax ignores:
    the same for logits and log-probabilities, and not inflated by a large common offset."""
    import torch

    reference, candidate = reference.double(), candidate.double()
    diff = (reference - candidate).abs()
    centred = [m - m.mean(dim=-1, keepdim=True) for m in (reference, candidate)]
    cosine = torch.nn.functional.cosine_similarity(centred[0].flatten(), centred[1].flatten(), dim=0)
    same_top = (reference.argmax(-1) == candidate.argmax(-1)).float().mean()
    return {"max_abs_diff": float(diff.max()), "cosine": float(cosine), "top1_agreement": float(same_top)}


def as_logprobs(logits):
    """Log-softmax rows (float32) of a logits matrix: what runtimes report, for comparing with them."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1)


def runtime_probe(runtime: str, folder, mode: str, limits, positions: int = 24, manifest=None, **options):
    """Log-probabilities at the last `positions` positions of the probe (the rows `probe_logits` gives, as
    log-probabilities), run by a dfj runtime on an exported folder through the runtime interface only.
    `manifest`: the folder's manifest-to-be, for a runtime that reads its layout from it (ONNX) before the
    export writes it (the parity this probe measures goes into it)."""
    from pathlib import Path

    import torch

    from dfj.images import fit_to_grid
    from dfj.runtime import create
    from dfj.runtime.base import Prompt, Scoring, chat_ids
    from dfj.sources import Source

    backend = create(runtime, Source("model", Path(folder), mode, str(folder), manifest=manifest), device="cpu", dtype=None,
                     limits=limits, **options)
    try:
        ids = chat_ids(probe_chat(mode), backend.tokenize)
        # Row i of a scoring predicts forced[i] from everything before it: forcing the last positions - 1
        # ids plus one filler gives the rows of the last `positions` positions (the filler is never read).
        cut = len(ids) - positions + 1
        prompt = Prompt(fit_to_grid(probe_image(), limits), tuple(ids[:cut]))
        result = backend.score([prompt], [Scoring(tuple(ids[cut:]) + (ids[-1],), full=True)])[0]
        if isinstance(result, Exception):
            raise result
        return torch.from_numpy(result.rows)
    finally:
        backend.close()


# -- the probe as each format's runtime answers it, and the reference within a memory budget ----------
# What a parity probe may hold in weights before the reference runs with its layers on disk.
PROBE_MEMORY_BYTES = 2 * 1024**3
# Text positions a llama.cpp context sized to the probe holds besides the image (the probe needs under
# a thousand; llama.cpp allocates its whole KV cache up front: 16 MB a layer for an f32 file at 8,192).
PROBE_TEXT_POSITIONS = 1024


def bounded_probe_logits(model_dir, processor, mode: str, dtype: str, *, memory: int = PROBE_MEMORY_BYTES,
                         hooks=None):
    """Probe logits of the checkpoint in `model_dir` through transformers. A model whose weights (as
    `dtype`) fit in `memory` bytes loads whole; a bigger one runs with its layers on disk. `hooks(model,
    checkpoint)`, a context manager, runs around the forward (the merge runs base + adapter unmerged)."""
    import contextlib
    import tempfile
    from pathlib import Path

    from dfj import hf
    from dfj.artifact.checkpoint import Checkpoint

    checkpoint = Checkpoint(Path(model_dir))
    itemsize = hf.torch_dtype(dtype, "cpu").itemsize
    fits = sum(checkpoint.numel(key) for key in checkpoint.keys()) * itemsize <= memory
    with tempfile.TemporaryDirectory(prefix="dfj-offload-") as offload:
        with hf.quiet_transformers():
            model = hf.load_model(model_dir, dtype=hf.torch_dtype(dtype, "cpu"), offload_folder=None if fits else Path(offload))
        with hooks(model, checkpoint) if hooks is not None else contextlib.nullcontext():
            return probe_logits(model, processor, mode)


def gguf_probe_logits(folder, mode: str, limits, normalizer: str | None, positions: int = 24):
    """Log-probabilities at the last `positions` positions of the probe, run by llama.cpp on `folder`'s
    GGUF files, in a context sized to the probe."""
    from dfj.images import PATCH_FACTOR

    image = probe_image()
    image_tokens = -(-max(image.width * image.height, limits.min_pixels) // PATCH_FACTOR**2)
    context = -(-(PROBE_TEXT_POSITIONS + image_tokens) // 256) * 256
    return runtime_probe("llamacpp", folder, mode, limits, positions, context=context, normalizer=normalizer)


def onnx_probe_logits(folder, manifest):
    """The probe through the ONNX runtime: log-probabilities at the probe's last positions. The runtime
    reads the graphs' layout from `manifest` (the folder's, or the one an export will write)."""
    from dfj.images import PixelLimits

    return runtime_probe("onnx", folder, manifest.mode, PixelLimits(**manifest.pixels), manifest=manifest)
