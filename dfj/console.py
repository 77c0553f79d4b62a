"""Console output shared by the CLI and the demo (rich tables)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfj.manifest import Manifest
from dfj.verdicts import PairwiseVerdict, PointwiseVerdict

# Piped output (CI logs, `| tee`) gets a readable width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)


def print_verdict(mode: str, verdict: PointwiseVerdict | PairwiseVerdict) -> None:
    table = Table(show_header=False, box=None)
    if isinstance(verdict, PointwiseVerdict):
        table.add_row("score", str(verdict.score) if verdict.score is not None else "-")
        if verdict.expected_score is not None:
            table.add_row("expected score", f"{verdict.expected_score:.3f}")
        table.add_row("reasoning", verdict.reasoning or "-")
    else:
        table.add_row("choice", verdict.choice or "-")
        if verdict.p_a is not None:
            table.add_row("P(A)", f"{verdict.p_a:.3f}")
        if verdict.swap_consistent is not None:
            table.add_row("swap check", f"B-first says {verdict.swapped_choice}: "
                          + ("consistent" if verdict.swap_consistent else "position-dependent"))
    if verdict.error:
        table.add_row("error", f"[red]{verdict.error}[/red]")
    table.add_row("output", repr(verdict.text[:300]))
    console.print(table)


def print_manifest(path: str | Path, manifest: Manifest | None) -> None:
    if manifest is None:
        console.print(f"{path}: no dfj.json")
        return
    table = Table(title=f"dfj artifact {path}", show_header=False)
    table.add_row("mode", manifest.mode)
    table.add_row("format", manifest.format)
    table.add_row("quant", manifest.quant)
    table.add_row("source", str(manifest.source.get("name", manifest.source.get("kind", ""))))
    table.add_row("pixels", f"{manifest.pixels.get('min_pixels')}..{manifest.pixels.get('max_pixels')}")
    size = sum((Path(path) / name).stat().st_size for name in manifest.files if (Path(path) / name).is_file())
    table.add_row("files", f"{len(manifest.files)} ({size / 1e6:.1f} MB)")
    if manifest.parity:
        table.add_row("parity", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in manifest.parity.items()))
    if len(manifest.chain) > 1:  # a quantized artifact: how it got here, one stage a line
        table.add_row("chain", "\n".join(
            f"{link['stage']}: {link['quant']} from {link['source']} (cosine {link['parity'].get('cosine', float('nan')):.6f})"
            for link in manifest.chain))
    table.add_row("dfj", f"{manifest.dfj_version} ({manifest.created})")
    console.print(table)


class progress_bar:
    """A rich progress bar usable as a `(done, total)` callback: `with progress_bar("judging") as cb:`."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=True)
        self._description = description
        self._task = None

    def __enter__(self):
        self._progress.__enter__()
        self._task = self._progress.add_task(self._description, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


class bench_progress:
    """A progress bar per judge for `dfj bench`: usable as a `(name, done, total)` callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console)
        self._tasks: dict[str, object] = {}

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __call__(self, name: str, done: int, total: int) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total)
        self._progress.update(self._tasks[name], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
