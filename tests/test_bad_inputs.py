"""The hostile-input corpus (tests/bad_inputs.py) through `dfj judge --data … --out …`, in one process.

The run must finish, write one line per input line in order, give each case exactly its documented
outcome, and keep its peak memory bounded (a decoded bomb alone would take over 1 GB).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from bad_inputs import CASES, ERROR, build_corpus

pytestmark = pytest.mark.slow

PEAK_RSS_LIMIT_MB = 1800  # measured 1120 MB; one decoded bomb (30000² RGB) alone is 2.7 GB

# `dfj` itself, reporting its peak resident memory (MB) to the file named by DFJ_TEST_RSS_FILE.
WRAPPER = """
import os
from dfj.bench.worker import peak_rss_mb
from dfj.cli import main
try:
    main()
finally:
    with open(os.environ["DFJ_TEST_RSS_FILE"], "w") as fh:
        fh.write(str(int(peak_rss_mb())))
"""


@pytest.fixture(scope="module")
def corpus_run(module_dir):
    from dfj.tiny import trained_tiny_judge

    judge = trained_tiny_judge("pointwise")
    folder = module_dir("corpus")
    split = build_corpus(folder)
    out, rss = folder / "results.jsonl", folder / "rss.txt"
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, "judge", str(judge), "--data", str(split), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "DFJ_TEST_RSS_FILE": str(rss)},
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return proc, rows, int(rss.read_text())


def test_corpus_has_the_promised_breadth():
    assert len(CASES) >= 40
    assert sum(c.expect[0] == ERROR for c in CASES) >= 30


def test_the_run_survives_and_accounts_for_every_line(corpus_run):
    proc, rows, _ = corpus_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["dfj"]["line"] for r in rows] == list(range(1, len(CASES) + 1))
    assert f"{len(CASES)} lines" in proc.stdout
    # Every line is counted once: a verdict, an output without one (the model's miss), or an input error.
    counts = re.search(r"(\d+) verdicts, (\d+) outputs without a verdict, (\d+) input errors", proc.stdout)
    verdicts, unparsed, errors = map(int, counts.groups())
    assert errors == sum(c.expect[0] == ERROR for c in CASES)
    assert verdicts + unparsed == sum(c.expect[0] != ERROR for c in CASES)
    assert verdicts == sum(r["dfj"]["error"] is None for r in rows)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_each_case_has_its_documented_outcome(corpus_run, index):
    case = CASES[index]
    result = corpus_run[1][index]["dfj"]
    kind, text = case.expect
    if kind == ERROR:
        assert result["error"] and text in result["error"], (case.what, result["error"])
        assert result["error"].startswith(f"line {index + 1}: ")
        assert result["score"] is None if "score" in result else True
    else:
        # The record reached the judge: its output is kept. A verdict is parsed from that output; an
        # output without one is reported as the model's, never as a problem with the input.
        assert result.get("text"), (case.what, result["error"])
        if result["error"] is None:
            # The verdict is the one its text parses to. The reasoning block is the model's to write
            # (the parser, like the DFJ scripts, needs only the score): a judge trained on an AVX2-only
            # machine answers this case with a bare `<score>1</score>`.
            from dfj.parse import parse_pointwise

            parsed = parse_pointwise(result["text"])
            assert result["score"] in (1, 2, 3, 4, 5) and (result["score"], result["reasoning"]) == (parsed.score, parsed.reasoning)
        else:
            assert result["error"].startswith(f"line {index + 1}: judge output unusable: "), (case.what, result["error"])
            assert result["score"] is None


def test_non_object_lines_keep_their_text(corpus_run):
    rows = corpus_run[1]
    by_name = {c.name: rows[i] for i, c in enumerate(CASES)}
    assert by_name["json_array"]["dfj"]["input"] == '["images/ok.png", "fake", "r"]'
    assert by_name["messages_ok"]["messages"][0]["role"] == "user"  # original fields carried over
    assert by_name["unknown_label"]["label"] == "genuine"


def test_memory_stays_bounded(corpus_run):
    assert corpus_run[2] < PEAK_RSS_LIMIT_MB, f"peak RSS {corpus_run[2]} MB"
