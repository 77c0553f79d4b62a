"""Judge speed: the reference path (plain `generate`, no caches, one record at a time, as the DFJ
scripts do) against dfj's fast path, on the same records. A benchmark, not a test.

    python -m dfj.bench.speed --mode pairwise [--text-layers 4] [--vision-layers 4] [--out speed.json]
                              [--artifacts gguf-q8_0 gguf-q4_k_m onnx-int8 …]

The judge is bench-shaped: the real Qwen2.5-VL-3B widths and heads (text 2048 / 16 heads / 2 KV
heads, vision 1280 / 16 heads), fewer layers, random weights; records are DFJ-shaped (one image near
the training pixel cap, 10 pairs or 5 responses on it, paragraph-long responses). With random weights
a pairwise judge never writes a well-formed `<answer>`, so pairwise agreement is measured between
the one-forward verdict with and without the caches; pointwise compares the greedy text of both
paths. Decoding is capped for both paths alike: pointwise at `--new-tokens` (a DFJ verdict's
length), pairwise at the length of `<answer>X</answer>` plus the end-of-turn step.

`--artifacts` also exports the bench judge in those formats (kept in the work folder) and times each
one's fast path on its default runtime over the same records, against the same torch reference:
per-verdict seconds, speed-up, and agreement with the torch fast path (pairwise: same choice and
|Δ p_a|; pointwise: same greedy text). Whether a quantization stays within the bench tolerances is
measured on the trained tiny judges by `dfj bench` (`dfj demo`), not on random weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

BENCH_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                  vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
BENCH_VISION = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)
IMAGE_SIZE = (1036, 952)  # ≈ 0.99 MP: resized to just under the 1,003,520-pixel training cap


def build_bench_judge(folder: Path, text_layers: int, vision_layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from dfj.testing import write_processor
    from dfj.tokenizer_assets import IMAGE_PAD_ID, IM_END_ID, ENDOFTEXT_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={**BENCH_TEXT, "num_hidden_layers": text_layers, "bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID},
        vision_config={**BENCH_VISION, "depth": vision_layers, "fullatt_block_indexes": [vision_layers - 1]},
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_processor(folder)
    return folder


def bench_records(mode: str, seed: int = 0) -> tuple[Any, list[dict[str, str]]]:
    from dfj.synthetic import detector_response, random_scene, render_image

    rng = random.Random(seed)
    scene = random_scene(rng)
    image = render_image(rng, scene, IMAGE_SIZE)

    def paragraph() -> str:  # a DFJ-length response: several sentences of reasoning
        parts = [detector_response(rng, scene, rng.randint(1, 5)) for _ in range(4)]
        reasons = " ".join(p.split("<reasoning>")[1].split("</reasoning>")[0] for p in parts)
        return f"<reasoning>{reasons}</reasoning> <answer>{rng.choice(['real', 'fake'])}</answer>"

    label = scene.label
    if mode == "pointwise":
        return image, [{"label": label, "response": paragraph()} for _ in range(5)]
    return image, [{"label": label, "response_a": paragraph(), "response_b": paragraph()} for _ in range(10)]


def _stage_times(judge, image, record, mode) -> dict[str, float]:
    """Image-encode and prefill seconds of one reference call, measured separately (the plain path
    runs them inside `generate`)."""
    import torch

    from dfj import prompts
    from dfj.images import load_image

    runtime = judge.runtime
    chat = prompts.render_chat(prompts.render(mode, record["label"], *_responses(record)))
    inputs = runtime.encode(load_image(image), chat)
    model = runtime.model
    with torch.inference_mode():
        started = time.perf_counter()
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        vision = time.perf_counter() - started
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1, use_cache=False)
        forward = time.perf_counter() - started
    return {"vision": vision, "prefill": max(forward - vision, 0.0), "prompt_tokens": int(inputs["input_ids"].shape[1])}


def _responses(record: dict[str, str]) -> tuple[str, ...]:
    return (record["response"],) if "response" in record else (record["response_a"], record["response_b"])


def run(mode: str, folder: Path, text_layers: int, vision_layers: int, new_tokens: int,
        artifacts: tuple[str, ...] = ()) -> dict[str, Any]:
    import dfj

    judge_dir = build_bench_judge(folder / f"bench-judge-t{text_layers}-v{vision_layers}", text_layers, vision_layers)
    image, records = bench_records(mode)
    judge = dfj.load_judge(str(judge_dir), mode=mode)
    if mode == "pairwise":
        # A trained pairwise judge writes `<answer>X</answer>` and stops; random weights never stop,
        # so the reference path decodes exactly that many tokens (plus the end-of-turn step).
        new_tokens = len(judge.runtime.tokenize("<answer>A</answer>")) + 1
    judge.max_new_tokens = new_tokens

    def reference_call(record):  # one record at a time, plain greedy generation, no caches
        if mode == "pointwise":
            return judge.score(image, record["label"], record["response"], fast=False)
        return judge.compare(image, record["label"], record["response_a"], record["response_b"], fast=False)

    stages = _stage_times(judge, image, records[0], mode)
    reference, reference_s = [], []
    for record in records:
        started = time.perf_counter()
        reference.append(reference_call(record))
        reference_s.append(time.perf_counter() - started)
    cached = judge.runtime.cached
    # The batch API: the records of one image run together (padded batch where the runtime has one).
    started = time.perf_counter()
    fast = judge.judge_many([{"image": image, **record} for record in records])
    fast_total = time.perf_counter() - started
    fast_stages = dict(cached.seconds)
    if mode == "pointwise":
        agreement = sum(a.text == b.text for a, b in zip(reference, fast)) / len(records)
        agreement_kind = "same greedy text, reference vs fast"
    else:  # the one-forward verdict without caches (fresh runtime state) vs with them
        judge.runtime._cached = None
        uncached = [judge.compare(image, r["label"], r["response_a"], r["response_b"], fast=True) for r in records[:1]]
        agreement = float(abs(uncached[0].p_a - fast[0].p_a) < 1e-4)
        agreement_kind = "one-forward p_a with vs without caches (|Δ| < 1e-4)"
    n = len(records)
    ref_total = sum(reference_s)
    rows = [_artifact_row(quant, judge_dir, mode, image, records, fast, new_tokens, ref_total) for quant in artifacts]
    ref_decode = max(ref_total / n - stages["vision"] - stages["prefill"], 0.0)
    return {
        "mode": mode, "records": n, "image_size": IMAGE_SIZE, "prompt_tokens": stages["prompt_tokens"],
        "text_layers": text_layers, "vision_layers": vision_layers, "new_tokens_cap": new_tokens,
        "reference_per_verdict_s": ref_total / n,
        "reference_split_s": {"vision": stages["vision"], "prefill": stages["prefill"], "decode": ref_decode},
        "fast_per_verdict_s": fast_total / n,
        "fast_split_s": {k: v / n for k, v in fast_stages.items()},
        "speedup": ref_total / fast_total,
        "agreement": agreement, "agreement_kind": agreement_kind,
        "cache": dict(cached.stats),
        "artifacts": rows,
    }


def _artifact_row(quant: str, judge_dir: Path, mode: str, image, records, torch_fast, new_tokens: int,
                  ref_total: float) -> dict[str, Any]:
    """The fast path of `judge_dir` exported as `quant`, on its default runtime, over the same records."""
    import dfj
    from dfj.export import export
    from dfj.manifest import read_manifest

    out = judge_dir.parent / f"{judge_dir.name}-{mode}-{quant}"  # the manifest records the mode
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or manifest.quant != quant:
        started = time.perf_counter()
        export(str(judge_dir), out, quant, mode=mode, overwrite=True)
        print(f"exported {quant} in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    judge = dfj.load_judge(str(out), mode=mode, max_new_tokens=new_tokens)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    verdicts = judge.judge_many([{"image": image, **record} for record in records])
    total = time.perf_counter() - started
    if mode == "pointwise":
        agreement = {"same_text_as_torch": sum(a.text == b.text for a, b in zip(verdicts, torch_fast)) / len(records)}
    else:
        agreement = {"same_choice_as_torch": sum(a.choice == b.choice for a, b in zip(verdicts, torch_fast)) / len(records),
                     "max_abs_delta_p_a": max(abs(a.p_a - b.p_a) for a, b in zip(verdicts, torch_fast))}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    stages = getattr(judge.runtime, "seconds", None)  # runtimes that time their stages
    split = {name: value / len(records) for name, value in stages.items()} if stages else None
    return {"quant": quant, "runtime": judge.runtime.name, "per_verdict_s": total / len(records),
            "split_s": split, "speedup_vs_reference": ref_total / total, "load_s": load_s,
            "size_bytes": size, **agreement}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pointwise", "pairwise"), required=True)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96, help="decode cap for both paths (pointwise)")
    parser.add_argument("--work", type=Path, default=None, help="where the bench judge is built (default: dfj cache)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--artifacts", nargs="*", default=[], help="--quant formats to time too (e.g. gguf-q8_0)")
    args = parser.parse_args(argv)
    from dfj.demo import default_cache

    result = run(args.mode, args.work or default_cache() / "speed", args.text_layers, args.vision_layers, args.new_tokens,
                 tuple(args.artifacts))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
