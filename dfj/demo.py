"""`dfj demo`: the whole path on a fresh machine, offline.

Uses the trained tiny DFJ judges (pointwise and pairwise LoRA adapters on a small Qwen2.5-VL trained
here on a synthetic DFJ-like task; trained once per machine and cached), merges each judge once,
exports every other format from that merge, quantizes with every method dfj has, and runs `dfj bench`
on held-out test records against the reference (base + adapter, unmerged): quality against the gold
labels, verdict agreement, logit and image-embedding parity, and cost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dfj.console import bench_progress, console

@dataclass(frozen=True)
class DemoArtifact:
    """One artifact the demo builds: `dfj export` (from `source`) or `dfj quant` (of `source`)."""

    name: str
    stage: Literal["export", "quant"]
    format: str  # dfj export --quant / dfj quant --method
    source: str | None  # another demo artifact's name; None: the trained adapter
    lossless: bool = False  # must pass the bench gate for the demo to succeed
    options: tuple[tuple[str, Any], ...] = ()


# Every export and quantization path dfj has. The adapter is merged once (merged-fp32); every other
# format is exported from that merge, and quantized from its lossless (or, for GGUF, f16) artifact, as
# a user would chain `dfj export` and `dfj quant`. A lossy artifact shows its measured gate result.
DEMO_ARTIFACTS: tuple[DemoArtifact, ...] = (
    DemoArtifact("merged-fp32", "export", "none", None, lossless=True, options=(("dtype", "float32"),)),
    DemoArtifact("merged-bf16", "export", "none", "merged-fp32", options=(("dtype", "bfloat16"),)),
    DemoArtifact("onnx-fp32", "export", "onnx-fp32", "merged-fp32", lossless=True),
    DemoArtifact("onnx-int8", "quant", "onnx-int8", "onnx-fp32"),
    DemoArtifact("onnx-int4", "quant", "onnx-int4", "onnx-fp32"),
    DemoArtifact("gptq-4bit", "quant", "gptq-4bit", "merged-fp32", options=(("samples", 128),)),  # calibrated on the training split
    DemoArtifact("gguf-f32", "export", "gguf-f32", "merged-fp32", lossless=True),
    DemoArtifact("gguf-f16", "export", "gguf-f16", "merged-fp32"),
    DemoArtifact("gguf-q8_0", "quant", "gguf-q8_0", "gguf-f16"),
    DemoArtifact("gguf-q4_k_m", "quant", "gguf-q4_k_m", "gguf-f16"),
)


MODES = ("pointwise", "pairwise")


def run_demo(cache: Path | None = None, records: int = 40) -> bool:
    from dfj.bench.forkserver import WorkerServers
    from dfj.bench.report import print_report
    from dfj.bench.run import BenchJudge, default_runtime, run_bench
    from dfj.tiny import default_cache, trained_tiny_judge, trained_tiny_split

    if cache is not None:
        os.environ["DFJ_CACHE"] = str(cache)
    root = default_cache() / "demo"
    started = time.perf_counter()
    adapters = {mode: trained_tiny_judge(mode) for mode in MODES}  # the first run on a machine trains them here
    _build_both_modes(root)
    passed = True
    with WorkerServers(root / "worker-servers") as servers:  # one per runtime for both benches
        for mode in MODES:
            artifacts = [BenchJudge(str(root / mode / item.name), default_runtime(str(root / mode / item.name)),
                                    label=item.name) for item in DEMO_ARTIFACTS]
            with bench_progress() as progress:
                report = run_bench(BenchJudge(str(adapters[mode]), "torch", label="reference (base+LoRA)"), artifacts,
                                   trained_tiny_split(mode, "test"), root / mode / "bench", limit=records,
                                   progress=progress, servers=servers)
            print_report(report.to_dict())
            console.print(f"report: {root / mode / 'bench' / 'report.md'}")
            lossless = {item.name for item in DEMO_ARTIFACTS if item.lossless}
            passed &= all(entry.passed for entry in report.artifacts if entry.name in lossless)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s: "
                  + ("[green]the lossless artifacts match the reference; lossy ones are measured above[/green]"
                     if passed else "[red]a lossless artifact does not match the reference[/red]"))
    return passed


def _build_both_modes(root: Path) -> None:
    """Build the two modes' artifacts at once, each mode's chain in a process of its own with half the
    cores: the chains are independent and mostly single-threaded Python (tracing, quantizer loops,
    file writing), so on 2 cores this takes little more than the longer chain. The benches run after
    it, one judge at a time, so nothing else runs while they measure."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, len(os.sched_getaffinity(0)) // len(MODES))
    with ProcessPoolExecutor(len(MODES), mp_context=multiprocessing.get_context("spawn"), initializer=_use_threads,
                             initargs=(threads,)) as pool:
        for future in [pool.submit(build_mode, mode, root) for mode in MODES]:
            future.result()


def _use_threads(threads: int) -> None:
    # Before any library that reads it is imported in this fresh (spawned) process.
    os.environ["OMP_NUM_THREADS"] = str(threads)


def build_mode(mode: str, root: Path) -> None:
    """Export and quantize every demo artifact of `mode` under `root / mode` (those already built from
    the same source are kept) and verify each."""
    from dfj.export import export
    from dfj.manifest import verify
    from dfj.quant import quantize
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    adapter = trained_tiny_judge(mode)
    for item in DEMO_ARTIFACTS:
        out = root / mode / item.name
        source = adapter if item.source is None else root / mode / item.source
        options = dict(item.options)
        if not _current(out, item, source):
            verb = "exporting" if item.stage == "export" else "quantizing"
            console.print(f"[bold]{mode}[/bold]: {verb} {source.name} -> {item.name} ({item.format}) -> {out}")
            if item.stage == "export":
                export(source, out, item.format, overwrite=True, **options)
            else:
                if item.format.startswith("gptq"):
                    options["calibration"] = trained_tiny_split(mode, "train")
                quantize(source, out, item.format, overwrite=True, **options)
        verify(out)


def _current(out: Path, item: DemoArtifact, source: Path) -> bool:
    """Whether `out` was built as `item` from `source` as it is now (the adapter by its weights' hash, an
    artifact by its manifest's), so a rerun rebuilds only what changed."""
    from dfj.hf import ADAPTER_WEIGHTS
    from dfj.manifest import MANIFEST_NAME, read_manifest, sha256_file

    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or manifest.quant != item.format:
        return False
    if item.source is None:
        wanted = {"adapter_sha256": sha256_file(source / ADAPTER_WEIGHTS)}
    else:
        wanted = {"manifest_sha256": sha256_file(source / MANIFEST_NAME)}
    wanted.update({k: v for k, v in item.options if k == "dtype"})
    return all(manifest.source.get(k) == v for k, v in wanted.items())
