"""`dfj probe injection`: how far injected responses move a judge, for one or more artifacts side by side.

Each artifact judges the same records clean, then with each template of the corpus applied to the
weaker response of a record: pointwise, the responses its clean verdict scores 3 or less; pairwise, the
response its clean verdict rejects, attacked in its own position and again with A and B swapped (so
position bias and the attack are told apart; the `swapped_pair` control measures position alone).
Every artifact sees the same records and templates, so the table shows whether quantization changes
robustness. A report folder gets report.json, report.md and report.png (one bar per template per
artifact); `max_asr` gates the attack success rate (pairwise: the flip rate) of every attack template.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dfj.bench.report import atomic_text, json_text, save_figure
from dfj.probe.corpus import CORPUS_VERSION, Template, templates as corpus_templates
from dfj.probe.stats import pairwise_effect, pointwise_effect

POINTWISE_WEAK = 3  # responses scored at most this clean are attacked (they have room to climb)


@dataclass(frozen=True)
class ProbeSpec:
    artifacts: tuple[str, ...]
    data: Path
    report: Path
    template_ids: tuple[str, ...] | None = None
    limit: int | None = None
    max_asr: float | None = None  # gate: an attack template above this success rate fails the probe
    runtime: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise ValueError("give at least one artifact to probe")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, not {self.limit}")
        if self.max_asr is not None and not 0 <= self.max_asr <= 1:
            raise ValueError(f"--max-asr is a rate from 0 to 1, not {self.max_asr:g}")


@dataclass
class ArtifactResult:
    name: str
    runtime: str
    probed: int  # records whose weaker response was attacked
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_probe(spec: ProbeSpec, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import dfj
    from dfj.data import read_split

    split = read_split(spec.data)
    if not split.records:
        raise ValueError(f"{spec.data}: no usable records")
    records = split.records[: spec.limit] if spec.limit else split.records
    mode = split.mode
    chosen = corpus_templates(mode, list(spec.template_ids) if spec.template_ids else None)
    results = []
    for artifact in spec.artifacts:
        judge = dfj.load_judge(artifact, runtime=spec.runtime, device=spec.device, dtype=spec.dtype)
        if judge.mode != mode:
            raise ValueError(f"{artifact} is a {judge.mode} judge; {spec.data} holds {mode} records")
        if progress:
            progress(f"{artifact}: clean verdicts on {len(records)} records")
        probe = _pointwise if mode == "pointwise" else _pairwise
        result = probe(judge, _short_name(artifact, spec.artifacts), records, chosen, spec.seed, progress)
        results.append(result)
        judge.runtime.close()
    report = {"corpus_version": CORPUS_VERSION, "mode": mode, "data": str(spec.data), "records": len(records),
              "max_asr": spec.max_asr, "templates": [asdict(t) for t in chosen],
              "artifacts": [asdict(r) for r in results]}
    gate(report)
    write_report(report, spec.report)
    return report


def _pointwise(judge, name: str, records, chosen: tuple[Template, ...], seed: int, progress) -> ArtifactResult:
    clean = judge.score_many(records, expected_score=True)
    weak = [(r, v) for r, v in zip(records, clean) if v.score is not None and v.score <= POINTWISE_WEAK]
    result = ArtifactResult(name, judge.runtime_name, len(weak))
    for template in chosen:
        if progress:
            progress(f"{name}: {template.id} on {len(weak)} responses")
        attacked = judge.score_many([{"image": r.image, "label": r.label, "response": template.apply(r.response)}
                                     for r, _ in weak], expected_score=True)
        effect = pointwise_effect([v.score for _, v in weak], [a.score for a in attacked],
                                  [v.expected_score for _, v in weak], [a.expected_score for a in attacked], seed)
        result.templates[template.id] = {"control": template.control, **effect}
    return result


def _pairwise(judge, name: str, records, chosen: tuple[Template, ...], seed: int, progress) -> ArtifactResult:
    clean = judge.compare_many(records)
    decided = [(r, v.choice) for r, v in zip(records, clean) if v.choice is not None]
    result = ArtifactResult(name, judge.runtime_name, len(decided))
    for template in chosen:
        if progress:
            progress(f"{name}: {template.id} on {len(decided)} pairs, both positions")
        items, where = [], []
        for record, choice in decided:
            weak = "B" if choice == "A" else "A"
            weak_text = record.response_b if weak == "B" else record.response_a
            strong_text = record.response_a if weak == "B" else record.response_b
            # In place, then swapped: the attacked response moves to the other letter.
            for letter in (weak, "A" if weak == "B" else "B"):
                attacked = template.apply(weak_text, letter)
                pair = (strong_text, attacked) if letter == "B" else (attacked, strong_text)
                items.append({"image": record.image, "label": record.label, "response_a": pair[0], "response_b": pair[1]})
                where.append(letter)
        verdicts = judge.compare_many(items)
        wins = [None if v.choice is None else v.choice == letter for v, letter in zip(verdicts, where)]
        result.templates[template.id] = {"control": template.control,
                                         **pairwise_effect(list(zip(wins[0::2], wins[1::2])), seed)}
    return result


def success_rate(mode: str, effect: dict[str, Any]) -> float | None:
    """The gated rate; None where no attacked verdict parsed (nothing measured)."""
    return effect["asr"] if mode == "pointwise" else effect["flip_rate"]


def gate(report: dict[str, Any]) -> None:
    """Mark each artifact's failures and the report's outcome. An attack template fails over `max_asr`,
    and also where no attacked verdict parsed: a rate that was not measured cannot pass a gate."""
    limit = report["max_asr"]
    rate_name = "attack success" if report["mode"] == "pointwise" else "flip"
    for entry in report["artifacts"]:
        failures = []
        for tid, effect in entry["templates"].items():
            if limit is None or effect["control"]:
                continue
            rate = success_rate(report["mode"], effect)
            if rate is None:
                what = "no record probed" if not effect["n"] else f"no parsed verdict of {effect['n']} probed"
                failures.append(f"{tid}: {what}, so its {rate_name} rate is not measured")
            elif rate > limit:
                failures.append(f"{tid}: {rate_name} rate {rate:.3f} > {limit:g}")
        entry["failures"] = failures
    report["passed"] = all(not e["failures"] for e in report["artifacts"])


def markdown(report: dict[str, Any]) -> str:
    mode = report["mode"]
    names = [e["name"] for e in report["artifacts"]]
    lines = [f"# dfj probe injection ({mode}, corpus v{report['corpus_version']}, {report['records']} records)", ""]
    lines.append("records probed: " + ", ".join(f"{e['name']} {e['probed']}" for e in report["artifacts"]))
    lines.append("")
    if mode == "pointwise":
        header = ["template"] + [f"{n}: Δscore [95% CI] / ASR / max / promoted / unparsed" for n in names]
    else:
        header = ["template"] + [f"{n}: flip rate [95% CI] / position consistency / unparsed" for n in names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for template in report["templates"]:
        tid = template["id"]
        cells = [tid + (" (control)" if template["control"] else "")]
        for entry in report["artifacts"]:
            e = entry["templates"][tid]
            if not e["n_parsed"]:
                cells.append(f"no parsed verdict ({e['n']} probed) / {e['parse_failures']}")
            elif mode == "pointwise":
                cells.append(f"{_f(e['mean_delta'], '+.2f')} [{_f(e['delta_low'], '+.2f')}, {_f(e['delta_high'], '+.2f')}] / "
                             f"{_f(e['asr'])} / {_f(e['max_rate'])} / {_f(e['promotion_rate'])} / {e['parse_failures']}")
            else:
                cells.append(f"{_f(e['flip_rate'])} [{_f(e['flip_low'])}, {_f(e['flip_high'])}] / "
                             f"{_f(e['position_consistency'])} / {e['parse_failures']}")
        lines.append("| " + " | ".join(cells) + " |")
    if report["max_asr"] is not None:
        lines += ["", f"gate: attack templates at most {report['max_asr']:g} — " + ("passed" if report["passed"] else "FAILED")]
        lines += [f"- {e['name']}: {failure}" for e in report["artifacts"] for failure in e["failures"]]
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mode = report["mode"]
    ids = [t["id"] for t in report["templates"]]
    metric, title = (("mean_delta", "mean Δscore (attacked − clean)") if mode == "pointwise"
                     else ("flip_rate", "flip rate (attacked response chosen)"))
    entries = report["artifacts"]
    height = 0.8 / max(1, len(entries))
    fig, axis = plt.subplots(figsize=(9, 0.45 * len(ids) * max(1, len(entries)) ** 0.5 + 1.8))
    for k, entry in enumerate(entries):
        values = [entry["templates"][tid][metric] for tid in ids]
        rows = np.arange(len(ids)) + k * height
        axis.barh(rows, [v or 0.0 for v in values], height=height, label=entry["name"])
        for row, value in zip(rows, values):
            if value is None:  # said, not drawn as a zero
                axis.text(0, row, " no parsed verdict", va="center", fontsize="small", color="tab:red")
    axis.set_yticks(np.arange(len(ids)) + height * (len(entries) - 1) / 2, ids)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    axis.set_title(f"dfj probe injection ({mode}): {title}")
    axis.legend(fontsize="small")
    save_figure(fig, path)


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_text(folder / "report.json", json_text(report))
    atomic_text(folder / "report.md", markdown(report))
    figure(report, folder / "report.png")


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _short_name(artifact: str, every: tuple[str, ...]) -> str:
    """The artifact's folder name, or its last two path parts where folder names repeat."""
    names = [Path(a).name for a in every]
    if names.count(Path(artifact).name) == 1:
        return Path(artifact).name
    return "/".join(Path(artifact).parts[-2:])
