"""`dfj demo`: the whole path on a fresh machine, offline.

Uses the trained tiny DFJ judges (pointwise and pairwise LoRA adapters on a small Qwen2.5-VL trained
here on a synthetic DFJ-like task; trained once per machine and cached), exports each judge in every
lossless format, quantizes those with every method dfj has, and runs `dfj bench` on held-out test records against the reference (base +
adapter, unmerged): quality against the gold labels, verdict agreement, logit parity and cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dfj.report import bench_progress, console

# (artifact name, format, options, lossless, input): every export and quantization path dfj has. An
# artifact with an input is quantized from that artifact (`dfj quant`), the rest are exported from the
# adapter. A lossless artifact must pass the bench gate for the demo to succeed; a lossy one shows its
# measured gate result.
DEMO_ARTIFACTS: tuple[tuple[str, str, dict, bool, str | None], ...] = (
    ("merged-fp32", "none", {"dtype": "float32"}, True, None),
    ("merged-bf16", "none", {"dtype": "bfloat16"}, False, None),
    ("onnx-fp32", "onnx-fp32", {}, True, None),
    ("onnx-int8", "onnx-int8", {}, False, "onnx-fp32"),
    ("onnx-int4", "onnx-int4", {}, False, "onnx-fp32"),
    ("gptq-4bit", "gptq-4bit", {"samples": 128}, False, "merged-fp32"),  # calibrated on the judge's training split
    ("gguf-f32", "gguf-f32", {}, True, None),
    ("gguf-f16", "gguf-f16", {}, False, None),
    ("gguf-q8_0", "gguf-q8_0", {}, False, "gguf-f16"),
    ("gguf-q4_k_m", "gguf-q4_k_m", {}, False, "gguf-f16"),
)


def run_demo(cache: Path | None = None, records: int = 40) -> bool:
    from dfj.bench.report import print_report
    from dfj.bench.run import BenchJudge, default_runtime, run_bench
    from dfj.export import export
    from dfj.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify
    from dfj.quant import quantize
    from dfj.tiny import default_cache, trained_tiny_judge, trained_tiny_split

    if cache is not None:
        os.environ["DFJ_CACHE"] = str(cache)
    root = default_cache() / "demo"
    started = time.perf_counter()
    passed = True
    for mode in ("pointwise", "pairwise"):
        adapter = trained_tiny_judge(mode)
        artifacts = []
        for name, quant, options, _, input_name in DEMO_ARTIFACTS:
            out = root / mode / name
            manifest = read_manifest(out) if out.is_dir() else None
            if input_name is None:
                wanted = {"adapter_sha256": _sha(adapter), **{k: v for k, v in options.items() if k == "dtype"}}
            else:
                wanted = {"manifest_sha256": sha256_file(root / mode / input_name / MANIFEST_NAME)}
            current = manifest is not None and manifest.quant == quant and all(
                manifest.source.get(k) == v for k, v in wanted.items())
            if not current:
                if input_name is None:
                    console.print(f"[bold]{mode}[/bold]: exporting {name} (--quant {quant}) -> {out}")
                    export(adapter, out, quant, overwrite=True, **options)
                else:
                    console.print(f"[bold]{mode}[/bold]: quantizing {input_name} -> {name} (--method {quant}) -> {out}")
                    extra = {"calibration": trained_tiny_split(mode, "train")} if quant.startswith("gptq") else {}
                    quantize(root / mode / input_name, out, quant, overwrite=True, **options, **extra)
            verify(out)
            artifacts.append(BenchJudge(str(out), default_runtime(str(out)), label=name))
        with bench_progress() as progress:
            report = run_bench(BenchJudge(str(adapter), "torch", label="reference (base+LoRA)"), artifacts,
                               trained_tiny_split(mode, "test"), root / mode / "bench", limit=records,
                               progress=progress)
        print_report(report)
        console.print(f"report: {root / mode / 'bench' / 'report.md'}")
        lossless = {name for name, _, _, exact, _ in DEMO_ARTIFACTS if exact}
        passed &= all(entry["passed"] for entry in report["artifacts"] if entry["name"] in lossless)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s: "
                  + ("[green]the lossless artifacts match the reference; lossy ones are measured above[/green]"
                     if passed else "[red]a lossless artifact does not match the reference[/red]"))
    return passed


def _sha(adapter: Path) -> str:
    from dfj.hf import ADAPTER_WEIGHTS
    from dfj.manifest import sha256_file

    return sha256_file(Path(adapter) / ADAPTER_WEIGHTS)
