"""`dfj demo`: the whole path on a fresh machine, offline.

Uses the trained tiny DFJ judges (pointwise and pairwise LoRA adapters on a small Qwen2.5-VL trained
here on a synthetic DFJ-like task; trained once per machine and cached), merges each LoRA into a
standalone artifact, and judges held-out test records with both the reference (base + adapter) and
the merged artifact: quality against the gold labels, verdict agreement and logit parity.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from dfj.report import console, progress_bar


def default_cache() -> Path:
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj")


def _quality(mode: str, verdicts, records) -> str:
    from dfj.bench.metrics import pairwise_quality, pointwise_quality

    if mode == "pointwise":
        q = pointwise_quality([v.score for v in verdicts], [r.gold_score for r in records])
        pearson = "n/a" if q.pearson is None else f"{q.pearson:.3f}"
        rmse = "n/a" if q.rmse is None else f"{q.rmse:.3f}"
        return f"RMSE {rmse} / Pearson {pearson}"
    q = pairwise_quality([v.choice for v in verdicts], [r.gold_choice for r in records])
    return f"accuracy {100 * (q.accuracy or 0):.1f} %"


def run_demo(cache: Path | None = None, records: int = 40) -> bool:
    import dfj
    from dfj.data import read_split
    from dfj.export import merge
    from dfj.manifest import read_manifest
    from dfj.testing import trained_tiny_judge, trained_tiny_split

    if cache is not None:
        os.environ["DFJ_CACHE"] = str(cache)
    root = default_cache() / "demo"
    started = time.perf_counter()
    summary = Table(title=f"DFJ tiny judges: reference (base+LoRA) vs merged artifact, {records} held-out records per mode")
    for column in ("mode", "judge", "quality vs gold", "parse fail", "same verdict", "max |Δ logprob|", "size MB"):
        summary.add_column(column)
    ok = True
    for mode in ("pointwise", "pairwise"):
        adapter = trained_tiny_judge(mode)
        console.print(f"[bold]{mode}[/bold]: merging {adapter} -> {root / mode}")
        artifact = merge(adapter, root / mode, overwrite=True)
        batch = read_split(trained_tiny_split(mode, "test")).records[:records]
        reference = dfj.load_judge(str(adapter))
        merged = dfj.load_judge(str(artifact))
        with progress_bar(f"{mode}: base+LoRA") as progress:
            ref_verdicts = reference.judge_many(batch, progress)
        with progress_bar(f"{mode}: merged") as progress:
            art_verdicts = merged.judge_many(batch, progress)
        same = sum(a.text == b.text for a, b in zip(ref_verdicts, art_verdicts))
        worst = 0.0
        for record, verdict in list(zip(batch, ref_verdicts))[:3]:
            if verdict.text:
                a = reference.logprobs(record.image, record.label, *record.responses(), continuation=verdict.text)
                b = merged.logprobs(record.image, record.label, *record.responses(), continuation=verdict.text)
                worst = max(worst, float(np.abs(a - b).max()))
        ok &= same == len(batch) and worst <= 1e-4
        size = sum(p.stat().st_size for p in Path(artifact).iterdir()) / 1e6
        for name, verdicts, lp, mb in (("base+LoRA", ref_verdicts, "-", "-"), ("merged", art_verdicts, f"{worst:.1e}", f"{size:.0f}")):
            fails = sum(v.error is not None for v in verdicts)
            summary.add_row(mode, name, _quality(mode, verdicts, batch), f"{fails}/{len(batch)}",
                            f"{same}/{len(batch)}" if name == "merged" else "-", lp, mb)
        parity = read_manifest(artifact).parity
        console.print(f"  merge probe: max |Δ logit| {parity['max_abs_diff']:.1e}, top-1 agreement {parity['top1_agreement']:.3f}")
    console.print(summary)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s: "
                  + ("[green]the merged artifacts judge exactly as base+LoRA[/green]" if ok else "[red]PARITY FAILURE[/red]"))
    return ok
