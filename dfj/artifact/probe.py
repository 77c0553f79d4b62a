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
