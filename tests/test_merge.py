"""LoRA merge export: parity with base+adapter, key layouts, refusals, atomic and repeatable output."""

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import dfj
from dfj import hf
from dfj.data import read_split
from dfj.export import merge
from dfj.manifest import ArtifactError, read_manifest, sha256_file

pytestmark = pytest.mark.slow

CONT = {
    "pointwise": "<reasoning>The response grounds the fake label in the image.</reasoning>\n<score>4</score>",
    "pairwise": "<answer>B</answer>",
}
ARTIFACT_FILES = {"config.json", "generation_config.json", "model.safetensors", "chat_template.jinja",
                  "processor_config.json", "tokenizer.json", "tokenizer_config.json", "dfj.json"}


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_merged_artifact_matches_base_plus_adapter(mode, tiny, merged, judges, tiny_split):
    artifact = merged(mode)
    assert {p.name for p in artifact.iterdir()} == ARTIFACT_FILES
    manifest = read_manifest(artifact)
    assert manifest.mode == mode and manifest.format == "safetensors" and manifest.quant == "none"
    assert manifest.source["kind"] == "adapter" and manifest.source["adapter_layout"] == "peft"
    assert manifest.pixels == {"min_pixels": 3136, "max_pixels": 1003520}
    assert set(manifest.prompt_templates) == {"pointwise", "pairwise"}
    assert manifest.parity["max_abs_diff"] <= 1e-4 and manifest.parity["top1_agreement"] == 1.0
    assert set(manifest.files) == ARTIFACT_FILES - {"dfj.json"}

    reference = judges(tiny(mode, adapter=True), max_new_tokens=16)
    exported = judges(artifact, max_new_tokens=16)
    base = judges(tiny(mode, adapter=True).parent / "base", max_new_tokens=16)
    assert exported.mode == mode
    worst = 0.0
    for record in read_split(tiny_split(mode, 20)).records[:3]:
        ref = reference.logprobs(record.image, record.label, *record.responses(), continuation=CONT[mode])
        out = exported.logprobs(record.image, record.label, *record.responses(), continuation=CONT[mode])
        plain = base.logprobs(record.image, record.label, *record.responses(), continuation=CONT[mode])
        worst = max(worst, float(np.abs(ref - out).max()))
        assert np.abs(ref - plain).max() > 1e-2  # the adapter matters, so the comparison can fail
        assert reference.judge(record).text == exported.judge(record).text
    assert worst <= 1e-4


def test_legacy_adapter_layout_is_mapped(tiny, judges, tiny_split):
    legacy = tiny("pointwise", adapter=True, adapter_layout="legacy")
    current = tiny("pointwise", adapter=True)
    keys = list(load_file(legacy / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.layers.") for k in keys)
    assert hf.adapter_key_layout(legacy) == "legacy" and hf.adapter_key_layout(current) == "peft"
    record = read_split(tiny_split("pointwise", 10)).records[0]
    a = judges(legacy, max_new_tokens=8).logprobs(record.image, record.label, record.response, continuation=CONT["pointwise"])
    b = judges(current, max_new_tokens=8).logprobs(record.image, record.label, record.response, continuation=CONT["pointwise"])
    assert np.abs(a - b).max() <= 1e-6


def test_unmapped_legacy_adapter_is_refused(tiny, monkeypatch):
    monkeypatch.setattr(hf, "LEGACY_ADAPTER_KEY_MAPPING", {})
    with pytest.raises(ArtifactError, match="did not load into the model"):
        dfj.load_judge(str(tiny("pointwise", adapter=True, adapter_layout="legacy")))


def _copy_adapter(tiny, tmp_path, mode="pointwise"):
    source = tiny(mode, adapter=True)
    target = tmp_path / "adapter"
    shutil.copytree(source, target)
    (target / "dfj.json").unlink()  # edited below; an ms-swift adapter has no manifest anyway
    return target


def test_noop_adapter_is_refused(tiny, tmp_path):
    adapter = _copy_adapter(tiny, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="changes nothing"):
        merge(adapter, tmp_path / "out", mode="pointwise")
    assert not (tmp_path / "out").exists()


def test_pickled_adapter_is_never_loaded(tiny, tmp_path):
    adapter = _copy_adapter(tiny, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="never loaded"):
        merge(adapter, tmp_path / "out", mode="pointwise")


def test_missing_untied_head_is_refused_and_tied_head_is_fine(tiny, tmp_path):
    broken = tmp_path / "nohead"
    shutil.copytree(tiny("pointwise"), broken)
    weights = load_file(broken / "model.safetensors")
    assert "lm_head.weight" in weights
    del weights["lm_head.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "dfj.json").unlink()
    with pytest.raises(ArtifactError, match="missing weights the model needs: lm_head.weight"):
        dfj.load_judge(str(broken), mode="pointwise")
    with pytest.raises(ArtifactError, match="lm_head.weight"):
        merge(broken, tmp_path / "out", mode="pointwise")
    tied = tiny("pointwise", tied=True)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    assert dfj.load_judge(str(tied), max_new_tokens=2).mode == "pointwise"


def test_export_is_repeatable_and_refuses_to_clobber(tiny, merged, tmp_path):
    first = merged("pairwise")
    out = tmp_path / "again"
    merge(tiny("pairwise", adapter=True), out)
    assert sha256_file(out / "model.safetensors") == sha256_file(first / "model.safetensors")
    assert read_manifest(out).files == read_manifest(first).files
    with pytest.raises(FileExistsError):
        merge(tiny("pairwise", adapter=True), out)
    merge(tiny("pairwise", adapter=True), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no partial or old folders left


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    from dataclasses import replace

    from dfj import tolerances

    impossible = replace(tolerances.EXPORT, lossless_atol=0.0, lossless_rtol=0.0, merge_min_cosine=2.0)
    monkeypatch.setattr(tolerances, "EXPORT", impossible)  # the merge reads its gate from the table
    with pytest.raises(RuntimeError, match="does not match its source"):
        merge(tiny("pointwise", adapter=True), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_tampered_artifact_is_refused(merged, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(merged("pointwise"), artifact)
    config = json.loads((artifact / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (artifact / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json does not match its checksum"):
        dfj.load_judge(str(artifact))
    shutil.copyfile(merged("pointwise") / "config.json", artifact / "config.json")
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing file tokenizer.json"):
        dfj.load_judge(str(artifact))
    shutil.copyfile(merged("pointwise") / "tokenizer.json", artifact / "tokenizer.json")
    (artifact / "pytorch_model.bin").write_bytes(b"planted")  # a pickle transformers could prefer
    with pytest.raises(ArtifactError, match="pytorch_model.bin is not listed in dfj.json"):
        dfj.load_judge(str(artifact))


def test_merging_a_merged_model_copies_it(merged, tmp_path):
    out = merge(merged("pointwise"), tmp_path / "copy")
    manifest = read_manifest(out)
    assert manifest.source["kind"] == "model" and manifest.parity["max_abs_diff"] == 0.0


def test_loading_an_adapter_does_not_import_gptqmodel(tiny):
    """peft would import GPTQModel (seconds, a banner, process-wide env changes) for every adapter."""
    import subprocess
    import sys

    code = f"import sys, dfj; dfj.load_judge({str(tiny('pointwise', adapter=True))!r}); print('gptqmodel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
