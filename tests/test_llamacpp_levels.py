"""llama.cpp's CPU levels: the wheel carries one CPU backend per instruction-set level, the runtime loads
the best one this CPU runs, a forced lower level (an older CPU's) judges the same, and a level that
dies on the model is passed over for the next one. Each case runs in a child process: a process
loads one CPU backend for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

JUDGE = """
import json, sys
import dfj
from dfj.data import read_split
judge = dfj.load_judge(sys.argv[1])
verdicts = judge.compare_many(read_split(sys.argv[2]).records[:10])
print(json.dumps({"described": judge.runtime.describe(), "choices": [v.choice for v in verdicts],
                  "p_a": [v.p_a for v in verdicts]}))
"""


@pytest.fixture(scope="module")
def q8(trained_gguf):
    return trained_gguf("pairwise", "q8_0")


def _judge(q8, cache, **env):
    from dfj.tiny import trained_tiny_split

    done = subprocess.run([sys.executable, "-c", JUDGE, str(q8), str(trained_tiny_split("pairwise"))],
                          env={**os.environ, "DFJ_CACHE": str(cache), **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_wheel_carries_every_level_from_sse2_to_amx():
    from dfj.runtime.llamacpp.library import levels

    assert {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"} <= set(levels())


def test_the_best_level_is_tried_on_the_model_once_and_a_forced_lower_level_judges_the_same(q8, tmp_path):
    best = _judge(q8, tmp_path)
    described = best["described"]
    assert described["llama_cpu_chosen_by"] == "score" and described["llama_cpu_level"] not in ("x64", "built-in")
    record = json.loads((tmp_path / "llama-cpu-levels.json").read_text())
    assert [(r["level"], r["failed"]) for r in record.values()] == [(described["llama_cpu_level"], None)]
    for level in ("haswell", "x64"):  # an AVX2 machine's level, and plain x86-64 (SSE2)
        forced = _judge(q8, tmp_path, DFJ_LLAMA_CPU=level)
        assert forced["described"]["llama_cpu_level"] == level and forced["described"]["llama_cpu_chosen_by"] == "DFJ_LLAMA_CPU"
        assert forced["choices"] == best["choices"]
        assert max(abs(a - b) for a, b in zip(forced["p_a"], best["p_a"])) < 0.05  # Q8_0 kernels of another width


def test_a_level_that_died_on_the_model_is_passed_over_for_the_next(q8, tmp_path):
    """Recorded as dead on this machine (as the AMX level is on this project's Xeon): the next level runs."""
    first = _judge(q8, tmp_path)
    top = first["described"]["llama_cpu_level"]
    record = tmp_path / "llama-cpu-levels.json"
    known = json.loads(record.read_text())
    for entry in known.values():
        entry["failed"] = "killed by SIGILL"
    record.write_text(json.dumps(known))
    again = _judge(q8, tmp_path)
    assert again["described"]["llama_cpu_level"] != top
    assert again["described"]["llama_cpu_chosen_by"] == f"score; {top} failed on this CPU (killed by SIGILL)"
    assert again["choices"] == first["choices"]


def test_a_level_the_cpu_cannot_run_or_the_wheel_lacks_is_refused_by_name(q8, tmp_path):
    from dfj.tiny import trained_tiny_split

    done = subprocess.run([sys.executable, "-c", JUDGE, str(q8), str(trained_tiny_split("pairwise"))],
                          env={**os.environ, "DFJ_CACHE": str(tmp_path), "DFJ_LLAMA_CPU": "pentium4"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "DFJ_LLAMA_CPU=pentium4: this llama.cpp carries the CPU levels" in done.stderr


def test_dfj_info_names_the_level_that_runs_a_gguf_artifact_here(q8):
    from typer.testing import CliRunner

    from dfj.cli import app

    result = CliRunner().invoke(app, ["info", str(q8)])
    assert result.exit_code == 0 and "llama.cpp on this machine: CPU level " in result.output, result.output
