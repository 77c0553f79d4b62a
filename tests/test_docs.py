"""The README and docs/ as a user follows them: every relative link leads somewhere real, and every
`dfj …` / `python -m …` command the README shows exists (its `--help` succeeds)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfj.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    slugs = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return slugs


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: — not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](missing.md) [bad anchor](page.md#nowhere)\n")
    targets = [t for t in LINK.findall(page.read_text()) if not (page.parent / t.partition("#")[0]).exists()
               or t.partition("#")[2] not in _anchors(page)]
    assert targets == ["missing.md", "page.md#nowhere"]


def _readme_commands() -> tuple[set[str], set[str]]:
    """The dfj subcommands and the `python -m` modules / `python FILE` scripts the README shows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    # What a user would type: code blocks and inline code, not prose.
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL) + re.findall(r"`([^`\n]+)`", text))
    dfj = {m.group(1) for m in re.finditer(r"(?:^|[\s/])dfj ((?:probe )?[a-z][a-z-]*)", code)}
    modules = set(re.findall(r"python -m ([\w.|]+)", code)) - {"pytest"}
    for alternatives in [m for m in modules if "|" in m]:
        base, _, rest = alternatives.rpartition(".")
        modules.discard(alternatives)
        modules.update(f"{base}.{name}" for name in rest.split("|"))
    scripts = set(re.findall(r"python ([\w/]+\.py)", code))
    return dfj, modules | scripts


def test_the_readme_shows_commands_and_each_exists():
    commands, programs = _readme_commands()
    assert {"export", "quant", "judge", "bench", "serve", "info", "demo", "probe injection"} <= commands
    for command in commands:
        result = CliRunner().invoke(app, [*command.split(), "--help"], prog_name="dfj")
        assert result.exit_code == 0, (command, result.output)
    assert "benchmarks.speed" in programs and "benchmarks/trained_spread.py" in programs
    for program in sorted(programs):
        argv = [sys.executable, program] if program.endswith(".py") else [sys.executable, "-m", program]
        done = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (program, done.stderr[-1500:])


def test_the_readme_stays_a_short_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    assert not [line for line in lines if re.search(r"\bissue \d+", line)], "history belongs in docs/results"


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` is the README's test command, step for step (pytest may take extra options there)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests:\s*```bash\n(.*?)```", text, re.DOTALL)
    assert block, "the README has no 'Run the tests' command"
    steps = [step.strip() for step in block.group(1).strip().split("&&")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == len(steps) and all(line.startswith(step) for line, step in zip(ci, steps)), (ci, steps)
    for script in re.findall(r"bash (scripts/[\w.-]+\.sh)", block.group(1)):
        assert (ROOT / script).is_file(), script
