import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dfj.cli import COMMANDS, app

runner = CliRunner()


def test_command_list_is_pinned():
    names = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMANDS) == {"judge", "export", "quant", "bench", "info", "serve", "probe", "verify-verdicts",
                                      "sign", "keygen", "demo"}


def test_help_is_instant_and_imports_no_heavy_library():
    code = "import sys, dfj, dfj.cli; heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "dfj.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_export_rejects_unknown_formats(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "-o", str(tmp_path / "o"), "--quant", "int3"])
    assert result.exit_code == 2 and "unknown --quant" in result.output


def test_info_on_a_non_artifact(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a dfj artifact" in result.output


@pytest.mark.slow
def test_export_info_and_judge_end_to_end(tiny, tiny_split, tmp_path):
    from dfj.data import read_split

    out = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(tiny("pointwise", adapter=True)), "-o", str(out), "--quant", "none"])
    assert result.exit_code == 0, result.output
    assert (out / "dfj.json").is_file()
    result = runner.invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 0 and "verified: 7 files" in result.output
    result = runner.invoke(app, ["export", str(tiny("pointwise", adapter=True)), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output

    record = read_split(tiny_split("pointwise", 10)).records[0]
    args = ["--image", record.image, "--label", record.label, "--response", record.response, "--max-new-tokens", "8"]
    result = runner.invoke(app, ["judge", str(out), *args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert set(payload) == {"mode", "score", "reasoning", "text", "error", "expected_score", "provenance"}
    assert payload["mode"] == "pointwise" and payload["provenance"]["run"]["artifact"]["mode"] == "pointwise"
    reference = json.loads(runner.invoke(app, ["judge", str(tiny("pointwise", adapter=True)), *args, "--json"]).output)
    # The merged artifact judges as base+adapter does; each verdict names its own judge.
    assert reference.pop("provenance")["run"]["artifact"]["format"] == "adapter"
    assert reference == {k: v for k, v in payload.items() if k != "provenance"}
    result = runner.invoke(app, ["judge", str(out), *args, "--response-b", "x"])
    assert result.exit_code == 2 and "pointwise judge" in result.output
    result = runner.invoke(app, ["judge", str(out), *args[:2], "--label", "unsure", "--response", "x"])
    assert result.exit_code == 2 and "unknown label" in result.output

    (out / "config.json").write_text("{}")
    result = runner.invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 2 and "config.json does not match" in result.output


@pytest.mark.slow
def test_judge_data_takes_the_pairwise_method_and_swap_check(tmp_path):
    """`--pairwise answer|generate` and `--swap-check` reach the batch path; mode-specific flags are refused
    on the other mode."""
    from batch_parity import shuffled_split
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    data, bad = shuffled_split(trained_tiny_split("pairwise", "test"), tmp_path / "split", 8)
    judge = str(trained_tiny_judge("pairwise"))
    rows = {}
    for method in ("answer", "generate"):
        out = tmp_path / f"{method}.jsonl"
        result = runner.invoke(app, ["judge", judge, "--jsonl", str(data), "--out", str(out), "--pairwise", method, "--swap-check"])
        assert result.exit_code == 0, result.output
        rows[method] = [json.loads(line)["dfj"] for line in out.read_text(encoding="utf-8").splitlines()]
    good = [i for i in range(9) if i != bad]
    assert all(rows["answer"][i]["p_a"] is not None and rows["answer"][i]["swap_consistent"] is not None for i in good)
    assert all(rows["generate"][i]["p_a"] is None and rows["generate"][i]["swap_consistent"] is not None for i in good)
    assert [rows["answer"][i]["choice"] for i in good] == [rows["generate"][i]["choice"] for i in good]
    assert "is empty" in rows["answer"][bad]["error"]
    refused = runner.invoke(app, ["judge", judge, "--jsonl", str(data), "--out", str(tmp_path / "x.jsonl"), "--expected-score"])
    assert refused.exit_code == 2 and "--expected-score" in refused.output
    refused = runner.invoke(app, ["judge", judge, "--jsonl", str(data), "--out", str(tmp_path / "x.jsonl"), "--pairwise", "fast"])
    assert refused.exit_code == 2 and "answer, generate" in refused.output


@pytest.mark.slow
def test_a_refused_option_is_reported_once(tiny):
    result = runner.invoke(app, ["judge", str(tiny("pairwise")), "--image", "x.png", "--label", "fake", "--response", "a",
                                 "--response-b", "b", "--expected-score"])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "--expected-score for pointwise judges" in result.output


@pytest.mark.slow
def test_the_image_encoder_option_is_for_gguf_judges_run_here(tiny, tmp_path):
    """`--vision` reaches the runtime's typed options: a torch judge names what it takes instead; the Ray
    engine, whose actors load judges elsewhere, refuses it before starting."""
    result = runner.invoke(app, ["judge", str(tiny("pairwise")), "--image", "x.png", "--label", "fake", "--response", "a",
                                 "--response-b", "b", "--vision", "torch"])
    assert result.exit_code != 0 and "unknown torch runtime options: vision" in result.output, result.output
    data = tmp_path / "data.jsonl"
    data.write_text("")
    result = runner.invoke(app, ["judge", str(tiny("pairwise")), "--jsonl", str(data), "--out", str(tmp_path / "o.jsonl"),
                                 "--engine", "ray", "--vision", "torch-bf16"])
    assert result.exit_code == 2 and "--bf16 and --vision are for --engine local" in result.output


@pytest.mark.parametrize("command", [*COMMANDS, "probe injection"])
def test_boolean_options_show_as_flags_in_help(command):
    result = runner.invoke(app, [*command.split(), "--help"], prog_name="dfj", terminal_width=200)
    assert result.exit_code == 0 and f"Usage: dfj {command}" in result.output
    assert "bool" not in result.output, result.output
