"""One tolerance table (`dfj.tolerances`): the bench's defaults are the table's, and no other module
sets a bound of its own."""

from __future__ import annotations

import ast
from dataclasses import asdict
from pathlib import Path

import dfj

BOUND_NAME = ("TOLERANCE", "COSINE", "ATOL", "RTOL", "MAX_ABS", "MIN_COS", "MAX_KL")


def test_the_bench_defaults_are_the_tables():
    from dfj.bench.run import DEFAULT_TOLERANCE, parse_tolerance
    from dfj.tolerances import BENCH

    assert DEFAULT_TOLERANCE == asdict(BENCH)
    assert parse_tolerance(None) == asdict(BENCH)
    assert parse_tolerance("vision_cos=0.5")["vision_cos"] == 0.5


def test_the_cli_gate_help_names_every_key_of_the_table():
    from typer.testing import CliRunner

    from dfj.cli import app
    from dfj.tolerances import BENCH

    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for key in asdict(BENCH):
        assert f"{key}=" in result.output, key


def test_no_module_outside_the_table_defines_a_bound():
    found = []
    for path in Path(dfj.__file__).parent.rglob("*.py"):
        if path.name == "tolerances.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and any(part in target.id.upper() for part in BOUND_NAME):
                    value = getattr(node, "value", None)
                    if not (isinstance(value, ast.Call) and getattr(value.func, "id", "") == "bench_defaults"):
                        found.append(f"{path.name}: {target.id}")
    assert not found, found
