"""Judge speed: the command line (`dfj judge --data`, the grouped batch-first path) against the
reference path (transformers `generate`, no caches, one record at a time, weights as loaded, as the
DFJ scripts do), on the same DFJ-shaped split. A benchmark, not a test.

    python -m benchmarks.speed --mode pairwise [--images 2] [--text-layers 4] [--vision-layers 4]
                              [--artifacts gguf-q8_0 gguf-q4_k_m onnx-int8 …] [--out docs/speed-pairwise.json]

The judge is bench-shaped: the real Qwen2.5-VL-3B widths and heads (text 2048 / 16 heads / 2 KV
heads, vision 1280 / 16 heads), fewer layers, random weights. The split is DFJ-shaped: `--images`
images near the training pixel cap, 10 pairs or 5 paragraph-long responses on each. Decoding is capped
for both paths alike: pointwise at `--new-tokens` (a DFJ verdict's length), pairwise (reference path)
at the length of `<answer>X</answer>` plus the end-of-turn step. With random weights a pairwise judge
never writes a well-formed `<answer>`, so pairwise agreement is the one-forward choice and p_a of each
artifact against torch; pointwise compares greedy text with the reference path.

`--artifacts` exports the bench judge in those formats (kept in the work folder) and times the same
command on each one's default runtime. Whether a quantization stays within the bench tolerances is
measured on the trained tiny judges by `dfj bench` (`dfj demo`), not on random weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.report import emit

IMAGE_SIZE = (1036, 952)  # ≈ 0.99 MP: resized to just under the 1,003,520-pixel training cap


def build_bench_judge(folder: Path, text_layers: int, vision_layers: int, seed: int = 0) -> Path:
    """A random-weight judge of the released 3B's widths with `text_layers` and `vision_layers` layers."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dfj.tiny import write_processor
    from dfj.tiny.full_depth import judge_config, real_shapes

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = judge_config(*real_shapes("3B", text_layers, vision_layers))
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_processor(folder)
    return folder


def bench_split(folder: Path, mode: str, images: int, seed: int = 0) -> Path:
    """A DFJ-shaped split folder: `images` images, 10 pairs or 5 paragraph-long responses on each."""
    from dfj.tiny.synthetic import detector_response, random_scene, render_image

    data = folder / "data.jsonl"
    if data.is_file():
        return folder
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(images):
        scene = random_scene(rng)
        name = f"images/{index:03d}.png"
        render_image(rng, scene, IMAGE_SIZE).save(folder / name)

        def paragraph() -> str:  # a DFJ-length response: several sentences of reasoning
            parts = [detector_response(rng, scene, rng.randint(1, 5)) for _ in range(4)]
            reasons = " ".join(p.split("<reasoning>")[1].split("</reasoning>")[0] for p in parts)
            return f"<reasoning>{reasons}</reasoning> <answer>{rng.choice(['real', 'fake'])}</answer>"

        if mode == "pointwise":
            lines += [{"image": name, "label": scene.label, "response": paragraph()} for _ in range(5)]
        else:
            lines += [{"image": name, "label": scene.label, "response_a": paragraph(), "response_b": paragraph()}
                      for _ in range(10)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder


def _reference(judge, split: Path, mode: str, new_tokens: int) -> tuple[list[Any], list[float]]:
    """One record at a time through transformers' own `generate` (no vision, prefix or KV reuse)."""
    from dfj.data import read_split
    from dfj.parse import parse

    verdicts, seconds = [], []
    for record in read_split(split, mode=mode).records:
        started = time.perf_counter()
        prompt = judge.prompt(record.image, record.label, *record.responses())
        verdicts.append(parse(mode, judge.runtime.decode(judge.runtime.reference_generate(prompt, new_tokens))))
        seconds.append(time.perf_counter() - started)
    return verdicts, seconds


def _command(source: str, split: Path, out: Path, mode: str, new_tokens: int, **options: Any) -> dict[str, Any]:
    """`dfj judge SOURCE --data SPLIT --out OUT`: the library calls the command makes, timed."""
    import dfj
    from dfj.batch import judge_jsonl

    started = time.perf_counter()
    judge = dfj.load_judge(source, mode=mode, max_new_tokens=new_tokens, **options)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    summary = judge_jsonl(judge, split, out, overwrite=True)
    total = time.perf_counter() - started
    rows = [json.loads(line)["dfj"] for line in out.read_text(encoding="utf-8").splitlines()]
    stages = getattr(judge.runtime, "seconds", None)
    described = judge.runtime.describe()
    judge.runtime.close()
    return {"runtime": judge.runtime.name, "kernels": described.get("llama_cpu_level") or described.get("cpu_kernels"),
            "load_s": load_s, "total_s": total, "per_verdict_s": total / summary.lines,
            "split_s": {k: v / summary.lines for k, v in stages.items()} if stages else None, "rows": rows}


def run(mode: str, folder: Path, text_layers: int, vision_layers: int, new_tokens: int, images: int = 2,
        artifacts: tuple[str, ...] = ()) -> dict[str, Any]:
    import dfj

    judge_dir = build_bench_judge(folder / f"bench-judge-t{text_layers}-v{vision_layers}", text_layers, vision_layers)
    split = bench_split(folder / f"split-{mode}-{images}", mode, images)
    # The DFJ scripts' path: transformers exactly as loaded, without dfj's packed weights.
    judge = dfj.load_judge(str(judge_dir), mode=mode, pack_weights=False)
    if mode == "pairwise":
        # A trained pairwise judge writes `<answer>X</answer>` and stops; random weights never stop,
        # so the reference path decodes exactly that many tokens (plus the end-of-turn step).
        new_tokens = len(judge.runtime.tokenize("<answer>A</answer>", True)) + 1
    judge.max_new_tokens = new_tokens
    reference, reference_s = _reference(judge, split, mode, new_tokens)
    judge.runtime.close()
    n = len(reference)
    ref_total = sum(reference_s)
    torch_row = _command(str(judge_dir), split, folder / f"out-{mode}-torch.jsonl", mode, new_tokens)
    rows = [{"artifact": "torch (merged fp32, packed linears)", **_summary(torch_row, ref_total, reference, torch_row, mode)}]
    for quant in artifacts:
        if quant == "torch-bf16":  # the fp32 judge with its vision tower and head in bf16 (TorchOptions.bf16)
            row = _command(str(judge_dir), split, folder / f"out-{mode}-torch-bf16.jsonl", mode, new_tokens,
                           bf16=("vision", "head"))
            rows.append({"artifact": "torch (fp32, vision and head in bf16)", **_summary(row, ref_total, reference, torch_row, mode)})
            continue
        out = _exported(judge_dir, mode, quant)
        row = _command(str(out), split, folder / f"out-{mode}-{quant}.jsonl", mode, new_tokens)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows.append({"artifact": quant, **_summary(row, ref_total, reference, torch_row, mode), "size_bytes": size})
    return {
        "mode": mode, "records": n, "images": images, "image_size": IMAGE_SIZE, "text_layers": text_layers,
        "vision_layers": vision_layers, "new_tokens_cap": new_tokens,
        "command": f"dfj judge ARTIFACT --data {split.name} --out OUT (grouped: {n // images} records per image)",
        "reference": "transformers generate, one record at a time, no caches, plain torch.nn.Linear",
        "reference_per_verdict_s": ref_total / n,
        "rows": rows,
    }


def _summary(row: dict[str, Any], ref_total: float, reference: list[Any], torch_row: dict[str, Any], mode: str) -> dict[str, Any]:
    n = len(reference)
    out = {k: row[k] for k in ("runtime", "kernels", "load_s", "per_verdict_s", "split_s")}
    out["speedup_vs_reference"] = ref_total / row["total_s"]
    if mode == "pointwise":
        out["same_text_as_reference"] = sum(r["text"] == v.text for r, v in zip(row["rows"], reference)) / n
    else:
        out["same_choice_as_torch"] = sum(r["choice"] == t["choice"] for r, t in zip(row["rows"], torch_row["rows"])) / n
        out["max_abs_delta_p_a"] = max(abs(r["p_a"] - t["p_a"]) for r, t in zip(row["rows"], torch_row["rows"]))
    return out


def _exported(judge_dir: Path, mode: str, quant: str) -> Path:
    from dfj.pipeline import build
    from dfj.manifest import read_manifest

    out = judge_dir.parent / f"{judge_dir.name}-{mode}-{quant}"  # the manifest records the mode
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or manifest.quant != quant:
        started = time.perf_counter()
        build(str(judge_dir), out, quant, mode=mode, overwrite=True)
        print(f"exported {quant} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pointwise", "pairwise"), required=True)
    parser.add_argument("--images", type=int, default=2, help="images in the split (10 pairs / 5 responses each)")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96, help="decode cap for both paths (pointwise)")
    parser.add_argument("--work", type=Path, default=None, help="where the bench judge is built (default: dfj cache)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--artifacts", nargs="*", default=[],
                        help="--quant formats to time too (e.g. gguf-q8_0), and torch-bf16 (vision and head in bf16)")
    args = parser.parse_args(argv)
    from dfj.tiny import default_cache

    result = run(args.mode, args.work or default_cache() / "speed", args.text_layers, args.vision_layers, args.new_tokens,
                 args.images, tuple(args.artifacts))
    emit(result, args.out)


if __name__ == "__main__":
    main()
