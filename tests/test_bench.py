"""`dfj bench` end to end on the trained tiny pairwise judge: reference base+LoRA, merged fp32 and bf16."""

import json
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dfj.cli import app
from kill_points import kill_env

pytestmark = pytest.mark.slow
runner = CliRunner()
LIMIT = 12
VISION_RECORDS = 40  # 4 images, 10 pairs each

REPORT_KEYS = {"schema", "created", "data", "tolerance", "reference", "artifacts", "passed"}
JUDGE_KEYS = {"name", "source", "runtime", "device", "dtype", "format", "quant", "error", "quality", "cost", "runtime_info"}
ARTIFACT_KEYS = JUDGE_KEYS | {"agreement", "parity", "vision", "delta", "failures", "passed"}
VISION_KEYS = {"images", "cos_min", "cos_mean", "rel_l2_max", "rel_l2_mean", "errors"}
COST_KEYS = {"import_s", "load_s", "latency_p50_s", "latency_p95_s", "records_per_s", "peak_rss_mb", "size_bytes"}
PARITY_KEYS = {"tokens", "kld_mean", "kld_p99", "kld_max", "rms_delta_p", "top1_agreement", "errors"}


@pytest.fixture(scope="module")
def setup(module_dir):
    from dfj.export import merge
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    root = module_dir("bench")
    reference = trained_tiny_judge("pairwise")
    fp32 = merge(reference, root / "merged-fp32", dtype="float32")
    bf16 = merge(reference, root / "merged-bf16", dtype="bfloat16")
    return {"root": root, "reference": reference, "fp32": fp32, "bf16": bf16,
            "data": trained_tiny_split("pairwise", "test")}


def _args(setup, report, *extra):
    return ["bench", str(setup["fp32"]), str(setup["bf16"]), "--reference", str(setup["reference"]),
            "--data", str(setup["data"]), "--limit", str(LIMIT), "--report", str(report), *extra]


@pytest.fixture(scope="module")
def first_run(setup):
    report = setup["root"] / "report"
    result = runner.invoke(app, _args(setup, report))
    return result, report, json.loads((report / "report.json").read_text())


def test_bench_passes_lossless_and_measures_lossy(first_run):
    result, _, report = first_run
    assert result.exit_code == 0, result.output
    fp32, bf16 = report["artifacts"]
    assert report["passed"] and fp32["passed"] and bf16["passed"]
    assert fp32["parity"]["kld_max"] < 1e-8 and fp32["parity"]["top1_agreement"] == 1.0 and fp32["agreement"] == 1.0
    assert fp32["delta"]["accuracy"] == 0.0
    # the image embeddings: the fp32 merge leaves the (unmerged) vision tower as it was
    assert fp32["vision"]["images"] == 2 and fp32["vision"]["cos_min"] > 1 - 1e-6 and fp32["vision"]["rel_l2_max"] < 1e-5
    assert 0 < bf16["vision"]["rel_l2_mean"] < 0.05 and bf16["vision"]["cos_mean"] > 1 - report["tolerance"]["vision_cos"]
    # bf16 weights move the logits measurably, far less than the gate allows
    assert 1e-9 < bf16["parity"]["kld_mean"] < 0.01 and bf16["parity"]["rms_delta_p"] > 0
    assert bf16["cost"]["size_bytes"] < 0.6 * fp32["cost"]["size_bytes"]
    # Lossless: the merge gives the reference's verdicts, so its quality is the reference's, on any build.
    assert report["reference"]["quality"]["n"] == LIMIT and fp32["quality"] == report["reference"]["quality"]
    assert 0 <= report["reference"]["quality"]["accuracy"] <= 1 and report["data"]["published"] is None


def test_report_schema_markdown_and_figure(first_run):
    _, folder, report = first_run
    assert set(report) == REPORT_KEYS and report["schema"] == "dfj-bench/1"
    assert set(report["reference"]) == JUDGE_KEYS and set(report["reference"]["cost"]) == COST_KEYS
    assert report["reference"]["runtime_info"]["runtime"] == "torch"
    for entry in report["artifacts"]:
        assert set(entry) == ARTIFACT_KEYS and set(entry["parity"]) == PARITY_KEYS and set(entry["vision"]) == VISION_KEYS
        assert entry["runtime_info"]["torch"] and entry["runtime_info"]["dtype"] in ("torch.float32", "torch.bfloat16")
        assert entry["parity"]["tokens"] >= LIMIT * 3  # `<answer>X</answer>` is several tokens per record
        assert entry["cost"]["peak_rss_mb"] > 100 and entry["cost"]["latency_p50_s"] > 0
    assert set(report["data"]) == {"path", "sha256", "mode", "records", "unreadable_lines", "gold", "published"}
    markdown = (folder / "report.md").read_text()
    assert markdown.count("\n| ") == 4 and "merged-bf16" in markdown and "Overall: PASS" in markdown
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_fails_past_tolerance_and_reuses_the_cache(setup, first_run):
    _, folder, _ = first_run
    result = runner.invoke(app, _args(setup, folder, "--tolerance", "kld=0"))
    assert result.exit_code == 1
    assert "out of tolerance: merged-bf16: kld: mean" in result.output
    report = json.loads((folder / "report.json").read_text())
    assert not report["passed"] and report["tolerance"]["kld"] == 0
    for stats in folder.glob("cache/*/stats.json"):
        assert json.loads(stats.read_text())["judged_this_run"] == 0
    result = runner.invoke(app, _args(setup, folder, "--tolerance", "speed=1"))
    assert result.exit_code == 2 and "bad tolerance" in result.output


def test_interrupted_bench_resumes_with_the_same_verdicts(setup, first_run, tmp_path):
    folder = tmp_path / "report"
    command = [sys.executable, "-m", "dfj.cli", *_args(setup, folder)]
    # The merged-fp32 worker kills the whole bench once it has written 4 verdicts: mid-run on any machine.
    proc = subprocess.run(command, env=kill_env("bench-verdicts:merged-fp32-:4"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    partial = list(folder.glob("cache/merged-fp32-*/verdicts.jsonl"))
    assert len(partial) == 1
    done_before = partial[0].read_bytes().count(b"\n")
    assert done_before == 4 < LIMIT
    result = runner.invoke(app, _args(setup, folder))
    assert result.exit_code == 0, result.output
    stats = json.loads((partial[0].parent / "stats.json").read_text())
    assert stats["judged_this_run"] == LIMIT - done_before
    first = json.loads((first_run[1] / "report.json").read_text())
    again = json.loads((folder / "report.json").read_text())
    for a, b in zip(first["artifacts"], again["artifacts"]):
        assert a["quality"] == b["quality"] and a["agreement"] == b["agreement"]
        assert a["parity"]["kld_mean"] == pytest.approx(b["parity"]["kld_mean"], rel=1e-6, abs=1e-12)


def test_a_damaged_vision_block_fails_the_vision_gate(setup, tmp_path):
    """A pairwise judge's verdicts need not show damage to its vision tower (the trained tiny judge
    hardly uses the image in most builds: docs/trained-judges.md); the embeddings the language model
    receives do, whatever the build. Whether the quality gates notice too depends on the build: not asserted."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dfj.manifest import read_manifest, write_manifest

    damaged = tmp_path / "vision-block-scaled"
    shutil.copytree(setup["fp32"], damaged)
    scaled = 0
    for shard in damaged.glob("*.safetensors"):
        tensors = load_file(shard)
        for key in tensors:
            if ".visual.blocks.1." in f".{key}" and key.endswith(".weight"):
                tensors[key] = tensors[key] * torch.tensor(1.05, dtype=tensors[key].dtype)
                scaled += 1
        save_file(tensors, shard, metadata={"format": "pt"})
    assert scaled >= 6  # the block's attention, MLP and norm weights
    write_manifest(damaged, read_manifest(damaged))
    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["bench", str(damaged), "--reference", str(setup["reference"]), "--data", str(setup["data"]),
                                 "--limit", str(VISION_RECORDS), "--report", str(report_dir)])
    assert result.exit_code == 1, result.output
    [entry] = json.loads((report_dir / "report.json").read_text())["artifacts"]
    assert "vision_cos" in [failure.split(":")[0] for failure in entry["failures"]], entry["failures"]
    assert entry["vision"]["cos_mean"] < 1 - json.loads((report_dir / "report.json").read_text())["tolerance"]["vision_cos"]
