"""Bench report outputs: report.json (the record), report.md (the table), report.png (the figure)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

COLUMNS = ("judge", "format", "quality", "Δ vs ref", "parse fail", "agree", "KLD mean / p99 / max", "top-1",
           "RMS Δp", "vision cos mean / min", "p50 s", "rec/s", "RSS MB", "size MB", "gate")
# The console keeps the columns that decide; report.md has them all.
CONSOLE_COLUMNS = ("judge", "format", "quality", "Δ vs ref", "parse fail", "agree", "KLD mean / p99 / max", "top-1",
                   "vision cos mean / min", "p50 s", "size MB", "gate")


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _quality_cell(mode: str, quality: dict | None) -> str:
    if quality is None:
        return "no gold"
    if mode == "pointwise":
        return f"RMSE {_num(quality['rmse'])} / r {_num(quality['pearson'])}"
    return f"acc {_num(None if quality['accuracy'] is None else 100 * quality['accuracy'], '.1f')} %"


def _delta_cell(mode: str, delta: dict | None) -> str:
    if delta is None:
        return "-"
    if mode == "pointwise":
        return f"{_num(delta.get('rmse'), '+.3f')} / {_num(delta.get('pearson'), '+.3f')}"
    acc = delta.get("accuracy")
    return f"{_num(None if acc is None else 100 * acc, '+.1f')} pt"


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The table rows, reference first."""
    mode = report["data"]["mode"]
    out = []
    for entry in [report["reference"], *report["artifacts"]]:
        is_ref = entry is report["reference"]
        quality, cost = entry["quality"], entry["cost"]
        parity = entry.get("parity") or {}
        parse = "-" if quality is None else f"{quality['n'] - quality['parsed']}/{quality['n']}"
        kld = "-" if is_ref else " / ".join(_num(parity.get(k), ".1e") for k in ("kld_mean", "kld_p99", "kld_max"))
        gate = "reference" if is_ref else ("pass" if entry["passed"] else "FAIL: " + "; ".join(entry["failures"]))
        out.append([
            entry["name"],
            f"{entry['format']}/{entry['quant']}" + (f" ({entry['dtype']})" if entry.get("dtype") else ""),
            _quality_cell(mode, quality),
            "-" if is_ref else _delta_cell(mode, entry.get("delta")),
            parse,
            "-" if is_ref else _num(entry.get("agreement"), ".3f"),
            kld,
            "-" if is_ref else _num(parity.get("top1_agreement"), ".4f"),
            "-" if is_ref else _num(parity.get("rms_delta_p"), ".2e"),
            "-" if is_ref else " / ".join(_num((entry.get("vision") or {}).get(k), ".6f") for k in ("cos_mean", "cos_min")),
            _num(cost["latency_p50_s"], ".2f"),
            _num(cost["records_per_s"], ".2f"),
            _num(cost["peak_rss_mb"], ".0f"),
            _num(None if cost["size_bytes"] is None else cost["size_bytes"] / 1e6, ".1f"),
            gate,
        ])
    return out


def markdown(report: dict[str, Any]) -> str:
    data = report["data"]
    lines = [f"# dfj bench: {data['mode']}, {data['records']} records of {data['path']}", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows(report):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    if data.get("published"):
        published = ", ".join(f"{k} {v}" for k, v in data["published"].items())
        lines += ["", f"Published DeepfakeJudge numbers for this set: {published}"]
    tolerance = ", ".join(f"{k}={v:g}" for k, v in report["tolerance"].items())
    lines += ["", f"Tolerance: {tolerance}. Overall: {'PASS' if report['passed'] else 'FAIL'}."]
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], path: Path) -> None:
    """Quality delta, latency and size per judge, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = report["data"]["mode"]
    entries = [report["reference"], *report["artifacts"]]
    names = [e["name"] for e in entries]
    metric = "rmse" if mode == "pointwise" else "accuracy"
    deltas = [0.0] + [((e.get("delta") or {}).get(metric) or 0.0) * (100 if metric == "accuracy" else 1)
                      for e in report["artifacts"]]
    colours = ["grey"] + ["tab:green" if e["passed"] else "tab:red" for e in report["artifacts"]]
    panels = [
        (f"Δ {metric}" + (" (points)" if metric == "accuracy" else "") + " vs reference", deltas),
        ("latency p50 (s)", [e["cost"]["latency_p50_s"] or 0.0 for e in entries]),
        ("size (MB)", [(e["cost"]["size_bytes"] or 0) / 1e6 for e in entries]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.6 * len(names) + 2.2))
    for axis, (title, values), fmt in zip(axes, panels, ("%+.3g", "%.3g", "%.0f")):
        bars = axis.barh(names, values, color=colours)
        axis.bar_label(bars, fmt=fmt, padding=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(title)
        axis.invert_yaxis()
        axis.margins(x=0.25)
    for axis in axes[1:]:
        axis.set_yticklabels([])
    fig.suptitle(f"dfj bench ({mode}, {report['data']['records']} records)")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out, write beside `path` and rename into place (a killed run leaves no half PNG), close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder = Path(folder)
    atomic_text(folder / "report.json", json_text(report))
    atomic_text(folder / "report.md", markdown(report))
    figure(report, folder / "report.png")


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from dfj.console import console

    data = report["data"]
    from rich import box
    from rich.console import Console

    table = Table(title=f"dfj bench: {data['mode']}, {data['records']} records", box=box.SIMPLE_HEAD)
    keep = [COLUMNS.index(c) for c in CONSOLE_COLUMNS]
    for column in CONSOLE_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows(report):
        table.add_row(*[row[i] for i in keep])
    wide = console if console.is_terminal else Console(width=190)  # logs: one line per judge
    wide.print(table)
    if data.get("published"):
        console.print("published DeepfakeJudge numbers: " + ", ".join(f"{k} {v}" for k, v in data["published"].items()))


def json_text(report: Any) -> str:
    """A report as strict JSON: a NaN or infinity is a bug to find, not a value to write (strict
    parsers reject it); "nothing to measure" is None."""
    return json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
