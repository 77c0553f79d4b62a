"""`dfj demo`: the whole path on a fresh machine, offline.

Uses the trained tiny DFJ judges (pointwise and pairwise LoRA adapters on a small Qwen2.5-VL trained
here on a synthetic DFJ-like task; trained once per machine and cached), exports each judge in every
format dfj supports, and runs `dfj bench` on held-out test records against the reference (base +
adapter, unmerged): quality against the gold labels, verdict agreement, logit parity and cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dfj.report import bench_progress, console

# (artifact name, --quant, export options, lossless): every export path dfj has. A lossless artifact
# must pass the bench gate for the demo to succeed; a lossy one shows its measured gate result.
DEMO_EXPORTS: tuple[tuple[str, str, dict, bool], ...] = (
    ("merged-fp32", "none", {"dtype": "float32"}, True),
    ("merged-bf16", "none", {"dtype": "bfloat16"}, False),
    ("onnx-fp32", "onnx-fp32", {}, True),
    ("onnx-int8", "onnx-int8", {}, False),
    ("onnx-int4", "onnx-int4", {}, False),
    ("gptq-4bit", "gptq-4bit", {"samples": 128}, False),  # calibrated on the judge's training split
    ("gguf-f32", "gguf-f32", {}, True),
    ("gguf-f16", "gguf-f16", {}, False),
    ("gguf-q8_0", "gguf-q8_0", {}, False),
    ("gguf-q4_k_m", "gguf-q4_k_m", {}, False),
)


def default_cache() -> Path:
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj")


def run_demo(cache: Path | None = None, records: int = 40) -> bool:
    from dfj.bench.report import print_report
    from dfj.bench.run import BenchJudge, default_runtime, run_bench
    from dfj.export import export
    from dfj.manifest import read_manifest, verify
    from dfj.testing import trained_tiny_judge, trained_tiny_split

    if cache is not None:
        os.environ["DFJ_CACHE"] = str(cache)
    root = default_cache() / "demo"
    started = time.perf_counter()
    passed = True
    for mode in ("pointwise", "pairwise"):
        adapter = trained_tiny_judge(mode)
        artifacts = []
        for name, quant, options, _ in DEMO_EXPORTS:
            out = root / mode / name
            manifest = read_manifest(out) if out.is_dir() else None
            wanted = {"adapter_sha256": _sha(adapter), **{k: v for k, v in options.items() if k == "dtype"}}
            current = manifest is not None and manifest.quant == quant and all(
                manifest.source.get(k) == v for k, v in wanted.items())
            if not current:
                console.print(f"[bold]{mode}[/bold]: exporting {name} (--quant {quant}) -> {out}")
                extra = {"calibration": trained_tiny_split(mode, "train")} if quant.startswith("gptq") else {}
                export(adapter, out, quant, overwrite=True, **options, **extra)
            verify(out)
            artifacts.append(BenchJudge(str(out), default_runtime(str(out)), label=name))
        with bench_progress() as progress:
            report = run_bench(BenchJudge(str(adapter), "torch", label="reference (base+LoRA)"), artifacts,
                               trained_tiny_split(mode, "test"), root / mode / "bench", limit=records,
                               progress=progress)
        print_report(report)
        console.print(f"report: {root / mode / 'bench' / 'report.md'}")
        lossless = {name for name, _, _, exact in DEMO_EXPORTS if exact}
        passed &= all(entry["passed"] for entry in report["artifacts"] if entry["name"] in lossless)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s: "
                  + ("[green]the lossless artifacts match the reference; lossy ones are measured above[/green]"
                     if passed else "[red]a lossless artifact does not match the reference[/red]"))
    return passed


def _sha(adapter: Path) -> str:
    from dfj.hf import ADAPTER_WEIGHTS
    from dfj.manifest import sha256_file

    return sha256_file(Path(adapter) / ADAPTER_WEIGHTS)
