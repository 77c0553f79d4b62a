"""Full-depth judges, judged: parity of the image path at the released 3B/7B shapes, image size by image size.

    python -m benchmarks.fullsize vision --size 3B [--quant gguf-q4_k_m] [--encoders mtmd torch torch-bf16]
                                         [--work DIR] [--out FILE.json]

The judge is the random-weight full-depth judge of `dfj.tiny.full_depth` (every layer at the released
shapes, bf16 weights), exported as `benchmarks.llama_server --full-depth` exports it (and reused from the
same folder). For each image size (the DFJ-typical 224×224 and 1036×952, the two sizes of llama.cpp's
issue 17534, a 56×3000 strip and the training maximum) a synthetic DFJ scene is fitted to the judge's grid
as dfj fits every image, then encoded by transformers' vision tower in float32 with the checkpoint's
weights (the reference) and by each of the GGUF artifact's image encoders (`dfj.load_judge(...,
vision=...)`: llama.cpp's mtmd on the f16 mmproj, and the mmproj's weights in transformers' tower).
Reported per size and encoder: the cosine of each image token's embedding with the reference's (minimum
and mean), the largest absolute difference, and the seconds each took. A benchmark, not a test: it needs
the full-depth judge (7 GB for the 3B) and minutes per image.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit

# (width, height): DFJ-typical, llama.cpp issue 17534's failing and working sizes, a strip, the training cap.
SIZES = ((224, 224), (1024, 484), (1083, 512), (1036, 952), (56, 3000), (1120, 896))


def reference_tower(base: Path):
    """transformers' vision tower and merger in float32 with the base checkpoint's `visual.*` weights."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

    from dfj.artifact.checkpoint import Checkpoint
    from dfj.runtime.llamacpp.torch_vision import vision_tower
    from dfj.tensor_names import canonical_key

    checkpoint = Checkpoint(base)
    return vision_tower(Qwen2_5_VLConfig.from_pretrained(base).vision_config, lambda shapes: (
        (canonical_key(key).removeprefix("visual."), checkpoint.read(key).float())
        for key in checkpoint.keys() if canonical_key(key).startswith("visual.")))


def scene(size: tuple[int, int], seed: int):
    from dfj.tiny.synthetic import random_scene, render_image

    rng = random.Random(seed)
    return render_image(rng, random_scene(rng), size)


def vision(size: str, quant: str, encoders: tuple[str, ...], folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor

    import dfj
    from benchmarks.llama_server import full_depth_artifact
    from dfj.images import PixelLimits, fit_to_grid
    from dfj.manifest import read_manifest

    artifact = full_depth_artifact(folder, size, "pairwise", quant)
    base = folder / f"full-{size}-pairwise" / "base"
    limits = PixelLimits(**read_manifest(artifact).pixels)
    images = [fit_to_grid(scene(wh, seed), limits) for seed, wh in enumerate(SIZES)]
    processor = AutoProcessor.from_pretrained(base).image_processor
    processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
    tower = reference_tower(base)
    references, reference_s = [], []
    for image in images:
        inputs = processor(images=[image], return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = tower(inputs["pixel_values"].float(), grid_thw=inputs["image_grid_thw"])
        reference_s.append(time.perf_counter() - started)
        references.append(getattr(out, "pooler_output", out).float().numpy())
    del tower
    rows: list[dict[str, Any]] = [{"requested": list(wh), "fitted": [image.width, image.height],
                                   "tokens": int(reference.shape[0]), "reference_s": seconds, "encoders": {}}
                                  for wh, image, reference, seconds in zip(SIZES, images, references, reference_s)]
    for encoder in encoders:
        judge = dfj.load_judge(str(artifact), mode="pairwise", vision=encoder)
        for row, image, reference in zip(rows, images, references):
            started = time.perf_counter()
            ours = judge.runtime.embed_images([judge.prompt(image, "fake", "a", "b")])[0]
            seconds = time.perf_counter() - started
            cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
            row["encoders"][encoder] = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
                                        "max_abs_diff": float(np.abs(ours - reference).max()), "seconds": seconds}
            print(f"{encoder} {row['fitted']}: min cosine {cosine.min():.7f}, {seconds:.1f} s", flush=True)
        judge.runtime.close()
    return {"size": size, "artifact": quant, "judge": f"full-depth {size}, random weights (dfj.tiny.full_depth)",
            "reference": "transformers' vision tower, float32, the checkpoint's weights", "threads": os.cpu_count(),
            "sizes": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("vision",))
    parser.add_argument("--size", choices=("3B", "7B"), default="3B")
    parser.add_argument("--quant", default="gguf-q4_k_m", help="the GGUF artifact whose mmproj is encoded")
    parser.add_argument("--encoders", nargs="+", default=["mtmd", "torch", "torch-bf16"],
                        choices=("mtmd", "torch", "torch-bf16"))
    parser.add_argument("--work", type=Path, default=None, help="where the full-depth judge is built (default: dfj cache)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from dfj.tiny import default_cache

    emit(vision(args.size, args.quant, tuple(args.encoders), args.work or default_cache() / "speed"), args.out)


if __name__ == "__main__":
    main()
