"""`dfj demo`: the whole path on a fresh machine, offline.

Builds tiny LoRA judges (pointwise and pairwise) and DFJ-format splits, merges each LoRA into a
standalone artifact, checks the artifact against base+adapter on real judge inputs, and judges a few
records with both, printing one table. The tiny judges are untrained: their verdicts are not
meaningful and mostly fail to parse (reported as parse failures, never turned into scores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from dfj.report import console


def default_cache() -> Path:
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj")


def run_demo(cache: Path | None = None, records: int = 5, max_new_tokens: int = 64) -> bool:
    import dfj
    from dfj.data import read_split
    from dfj.export import merge
    from dfj.testing import build_tiny_dataset, build_tiny_judge

    root = Path(cache or default_cache()) / "demo"
    started = time.perf_counter()
    summary = Table(title="merged artifact vs base+adapter (tiny untrained judges)")
    for column in ("mode", "artifact", "probe |Δlogit|", "logprob |Δ|", "same text", "parsed"):
        summary.add_column(column, overflow="fold")
    ok = True
    for mode in ("pointwise", "pairwise"):
        console.print(f"[bold]{mode}[/bold]: building tiny judge and split in {root}")
        adapter = build_tiny_judge(root / f"{mode}-judge", mode, adapter=True)
        split = read_split(build_tiny_dataset(root / f"{mode}-split", mode, n=max(records, 1)))
        merged = merge(adapter, root / f"{mode}-merged", overwrite=True)
        merge_parity = dfj.manifest.read_manifest(merged).parity

        reference = dfj.load_judge(str(adapter), max_new_tokens=max_new_tokens)
        artifact = dfj.load_judge(str(merged), max_new_tokens=max_new_tokens)
        batch = split.records[:records]
        ref_verdicts = reference.judge_many(batch)
        art_verdicts = artifact.judge_many(batch)
        same = sum(a.text == b.text for a, b in zip(ref_verdicts, art_verdicts))
        parsed = sum(v.error is None for v in art_verdicts)
        first = batch[0]
        continuation = "<answer>A</answer>" if mode == "pairwise" else "<reasoning>ok</reasoning>\n<score>3</score>"
        lp_ref = reference.logprobs(first.image, first.label, *first.responses(), continuation=continuation)
        lp_art = artifact.logprobs(first.image, first.label, *first.responses(), continuation=continuation)
        lp_diff = float(np.abs(lp_ref - lp_art).max())
        ok &= same == len(batch) and lp_diff <= 1e-4
        summary.add_row(
            mode, merged.name, f"{merge_parity.get('max_abs_diff', float('nan')):.1e}", f"{lp_diff:.1e}",
            f"{same}/{len(batch)}", f"{parsed}/{len(batch)}",
        )
        detail = Table(title=f"{mode} verdicts (merged artifact)")
        for column in ("line", "label", "gold", "verdict", "error"):
            detail.add_column(column)
        for record, verdict in zip(batch, art_verdicts):
            gold = record.gold_score if mode == "pointwise" else record.gold_choice
            value = getattr(verdict, "score", None) if mode == "pointwise" else getattr(verdict, "choice", None)
            detail.add_row(str(record.line), record.label, str(gold), str(value) if value is not None else "-",
                           (verdict.error or "")[:60])
        console.print(detail)
    console.print(summary)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s: "
                  + ("[green]merged artifacts match base+adapter[/green]" if ok else "[red]PARITY FAILURE[/red]"))
    return ok
