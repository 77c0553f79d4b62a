"""Verdicts a forensic report can cite: every verdict names the judge, input and settings that gave it;
a results file can be re-judged line by line (`dfj verify-verdicts`); an artifact can be signed, and a
missing or wrong signature is refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfj.cli import app
from dfj.provenance import read_sidecar, run_id, sidecar_path

runner = CliRunner()
NEW_TOKENS = 6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def artifact(merged):
    return merged("pointwise")


@pytest.fixture(scope="module")
def results(artifact, tiny_split, module_dir):
    """A results file of 12 records (two images' runs) with its sidecar, judged by the CLI."""
    from dfj.data import read_split

    folder = module_dir("provenance")
    split = tiny_split("pointwise", 12)
    shutil.copytree(split / "images", folder / "split" / "images")
    (folder / "split" / "data.jsonl").write_text("".join(json.dumps(
        {"image": str(Path(r.image).relative_to(split.resolve())), "label": r.label, "response": r.response}) + "\n"
        for r in read_split(split).records))
    out = folder / "results.jsonl"
    done = runner.invoke(app, ["judge", str(artifact), "--data", str(folder / "split"), "--out", str(out),
                               "--max-new-tokens", str(NEW_TOKENS), "--expected-score"])
    assert done.exit_code == 0, done.output
    return folder, out


def test_a_verdict_names_the_artifact_runtime_settings_and_input_it_came_from(artifact, judges, tiny_split):
    from dfj.data import read_split
    from dfj.provenance import text_sha256
    from dfj.version import __version__

    record = read_split(tiny_split("pointwise", 12)).records[0]
    judge = judges(artifact, max_new_tokens=NEW_TOKENS)
    verdict = judge.score(record.image, record.label, record.response)
    provenance = verdict.provenance
    run = provenance["run"]
    assert run["artifact"]["identity"] == {"judge": {"pinned_by": "dfj.json", "sha256": _sha256(artifact / "dfj.json")}}
    assert run["artifact"]["mode"] == "pointwise" and run["artifact"]["format"] == "safetensors"
    assert run["runtime"]["runtime"] == "torch" and run["runtime"]["device"] == "cpu" and run["runtime"]["torch"]
    assert run["max_new_tokens"] == NEW_TOKENS and run["dfj"] == __version__ and run["prompt_template_sha256"]
    assert provenance["run_id"] == run_id(run) == judge.run_id
    assert provenance["image_sha256"] == "sha256:" + _sha256(Path(record.image))
    assert provenance["responses_sha256"] == [text_sha256(record.response)]
    assert provenance["options"] == {"expected_score": False}
    # Another response, another hash; the same image bytes from memory, the same image hash.
    again = judge.score(Path(record.image).read_bytes(), record.label, record.response + " ")
    assert again.provenance["image_sha256"] == provenance["image_sha256"]
    assert again.provenance["responses_sha256"] != provenance["responses_sha256"]
    # Moving the artifact does not make it another judge.
    assert "path" not in json.dumps(run["artifact"])


def test_the_cli_verdict_and_a_results_file_carry_provenance(artifact, results, tiny_split):
    from dfj.data import read_split

    record = read_split(tiny_split("pointwise", 12)).records[0]
    single = runner.invoke(app, ["judge", str(artifact), "--image", record.image, "--label", record.label,
                                 "--response", record.response, "--max-new-tokens", str(NEW_TOKENS), "--json"])
    provenance = json.loads(single.stdout.strip().splitlines()[-1])["provenance"]
    folder, out = results
    sidecar = read_sidecar(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    [(rid, run)] = sidecar["runs"].items()
    assert rid == run_id(run) and sidecar["input"] == str((folder / "split" / "data.jsonl").resolve())
    assert run["max_new_tokens"] == NEW_TOKENS
    for row in rows:
        line = row["dfj"]["provenance"]
        assert line["run_id"] == rid and "run" not in line and line["options"] == {"expected_score": True}
        assert line["image_sha256"].startswith("sha256:") and 1 <= line["unit"] <= row["dfj"]["line"]
    # The CLI's single verdict: the same judge and settings (the same run), asked without the expected score.
    assert provenance["run_id"] == rid and provenance["run"] == run and provenance["options"] == {"expected_score": False}
    assert sorted({row["dfj"]["provenance"]["unit"] for row in rows}) == [1, 6, 11]  # 5 records per image: 5, 5 and 2


def test_verify_verdicts_finds_a_file_it_made_identical(artifact, results, tmp_path):
    _, out = results
    report = tmp_path / "verify.json"
    done = runner.invoke(app, ["verify-verdicts", str(out), "--artifact", str(artifact), "--report", str(report)])
    assert done.exit_code == 0, done.output
    body = json.loads(report.read_text())
    assert body["counts"] == {"identical": 12, "different": 0, "refused": 0, "skipped": 0} and body["passed"]
    sample = runner.invoke(app, ["verify-verdicts", str(out), "--artifact", str(artifact), "--sample", "3", "--seed", "7"])
    assert sample.exit_code == 0 and "3 identical" in sample.output


def _copy(results, tmp_path):
    folder, out = results
    shutil.copytree(folder / "split", tmp_path / "split")
    copy = tmp_path / "results.jsonl"
    copy.write_bytes(out.read_bytes())
    sidecar = read_sidecar(out)
    sidecar["input"] = str((tmp_path / "split" / "data.jsonl").resolve())
    sidecar_path(copy).write_text(json.dumps(sidecar))
    return copy, [json.loads(line) for line in copy.read_text().splitlines()]


def _write(copy, rows, raw_tail=b""):
    copy.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in rows) + raw_tail)


def _verify(copy, artifact, *extra):
    done = runner.invoke(app, ["verify-verdicts", str(copy), "--artifact", str(artifact), *extra])
    return done.exit_code, done.output


def test_an_edited_verdict_is_named_different_with_both_verdicts(artifact, results, tmp_path):
    copy, rows = _copy(results, tmp_path)
    rows[3]["dfj"]["text"] += "!"
    _write(copy, rows)
    code, output = _verify(copy, artifact)
    assert code == 1 and "line 4: different" in output and "11 identical, 1 different" in output
    assert '"text"' in output  # both verdicts shown


def test_a_changed_image_an_edited_response_a_torn_and_a_foreign_line_are_refused_by_line(artifact, results, tmp_path, merged):
    from PIL import Image

    copy, rows = _copy(results, tmp_path)
    image = tmp_path / "split" / rows[0]["image"]
    Image.open(image).rotate(90).save(image)  # the first image changed after judging: its unit is refused
    rows[9]["response"] = rows[9]["response"] + " (edited)"
    foreign = json.loads(json.dumps(rows[10]))
    foreign["dfj"]["provenance"]["run_id"] = "sha256:" + "0" * 64
    rows[10] = foreign
    torn = (json.dumps(rows[11]) + "\n").encode()[:40]
    _write(copy, rows[:11], torn)
    code, output = _verify(copy, artifact)
    assert code == 1, output
    assert "line 1: refused: line 1: the image" in output and "is not the one judged" in output
    assert "line 10: refused: line 10: its response text is not the one judged" in output
    assert "line 11: refused: line 11 names no run of this file's sidecar" in output
    assert "line 12: refused: line 12 is torn" in output
    assert "0 different" in output


def test_another_artifact_a_missing_image_and_a_missing_sidecar_are_refused(artifact, results, tmp_path, merged):
    copy, rows = _copy(results, tmp_path)
    code, output = _verify(copy, merged("pairwise"))
    assert code != 0 and ("is not the artifact that made these verdicts" in output or "pairwise" in output)
    (tmp_path / "split" / rows[0]["image"]).unlink()
    code, output = _verify(copy, artifact)
    assert code == 1 and "line 1: refused: line 1: its record no longer reads: image not found" in output
    sidecar_path(copy).unlink()
    code, output = _verify(copy, artifact)
    assert code == 2 and "provenance.json: not found" in output


def test_a_results_file_is_not_continued_by_another_artifact(results, tmp_path):
    import dfj
    from dfj.batch import judge_jsonl
    from dfj.manifest import read_manifest, write_manifest

    copy, rows = _copy(results, tmp_path)
    copy.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in rows[:5]))
    clone = tmp_path / "clone"  # the same weights under another dfj.json (a re-export): another judge's identity
    shutil.copytree(Path(read_sidecar(copy)["artifact_path"]), clone)
    manifest = read_manifest(clone)
    manifest.created = "2000-01-01T00:00:00Z"
    write_manifest(clone, manifest)
    with pytest.raises(ValueError, match="was judged by another artifact"):
        judge_jsonl(dfj.load_judge(str(clone), max_new_tokens=NEW_TOKENS), tmp_path / "split", copy, resume=True,
                    expected_score=True)


# -- signatures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed(artifact, module_dir):
    folder = module_dir("signed")
    copy = folder / "artifact"
    shutil.copytree(artifact, copy)
    done = runner.invoke(app, ["keygen", str(folder / "key")])
    assert done.exit_code == 0, done.output
    assert (folder / "key").stat().st_mode & 0o777 == 0o600
    done = runner.invoke(app, ["sign", str(copy), "--key", str(folder / "key")])
    assert done.exit_code == 0 and (copy / "dfj.json.sig").is_file(), done.output
    runner.invoke(app, ["keygen", str(folder / "other")])
    return copy, folder / "key.pub", folder / "other.pub"


def test_a_signed_artifact_verifies_and_loads_with_its_key(signed):
    import dfj

    copy, public, _ = signed
    done = runner.invoke(app, ["info", str(copy), "--verify", "--public-key", str(public)])
    assert done.exit_code == 0 and "dfj.json is signed by sha256:" in done.output, done.output
    judge = dfj.load_judge(str(copy), public_key=public, max_new_tokens=NEW_TOKENS)
    assert judge.mode == "pointwise"


def test_a_wrong_key_a_missing_signature_and_a_tampered_manifest_are_refused_by_name(signed, tmp_path):
    import dfj
    from dfj.manifest import ArtifactError

    copy, public, other = signed
    done = runner.invoke(app, ["info", str(copy), "--verify", "--public-key", str(other)])
    assert done.exit_code == 2 and "dfj.json.sig: signed by another key" in done.output
    unsigned = tmp_path / "unsigned"
    shutil.copytree(copy, unsigned)
    (unsigned / "dfj.json.sig").unlink()
    with pytest.raises(ArtifactError, match="dfj.json.sig: missing; the artifact is not signed"):
        dfj.load_judge(str(unsigned), public_key=public)
    tampered = tmp_path / "tampered"
    shutil.copytree(copy, tampered)
    manifest = json.loads((tampered / "dfj.json").read_text())
    manifest["mode"] = "pointwise"
    manifest["created"] = "1999-01-01T00:00:00Z"
    (tampered / "dfj.json").write_text(json.dumps(manifest))
    done = runner.invoke(app, ["info", str(tampered), "--verify", "--public-key", str(public)])
    assert done.exit_code == 2 and "the signature does not match" in done.output and "dfj.json" in done.output
    not_a_key = tmp_path / "garbage.pub"
    not_a_key.write_text("not a key")
    done = runner.invoke(app, ["info", str(copy), "--verify", "--public-key", str(not_a_key)])
    assert done.exit_code == 2 and "garbage.pub: not a PEM public key" in done.output


def test_judge_serve_and_bench_require_a_signature_when_asked(signed, tmp_path, tiny_split):
    copy, public, other = signed
    from dfj.data import read_split

    record = read_split(tiny_split("pointwise", 12)).records[0]
    done = runner.invoke(app, ["judge", str(copy), "--image", record.image, "--label", record.label, "--response", "r",
                               "--max-new-tokens", "2", "--require-signature", str(other)])
    assert done.exit_code == 2 and "signed by another key" in done.output
    serve = subprocess.run([sys.executable, "-m", "dfj.cli", "serve", str(copy), "--port", "0", "--require-signature", str(other)],
                           capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and "signed by another key" in serve.stderr  # before any port opens
    bench = runner.invoke(app, ["bench", str(copy), "--reference", str(copy), "--data", str(tiny_split("pointwise", 12)),
                                "--report", str(tmp_path / "bench"), "--require-signature", str(other)])
    assert bench.exit_code == 2 and "signed by another key" in bench.output and not (tmp_path / "bench").exists()
