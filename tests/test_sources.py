"""Where a judge comes from and how its mode is decided."""

import shutil

import pytest

import dfj
from dfj.manifest import ArtifactError
from dfj.sources import mode_from_name, resolve

HUB_ID = "MBZUAI/Qwen-2.5-VL-Instruct-3B-Pointwise-DFJ"


def test_mode_from_dfj_names():
    assert mode_from_name("MBZUAI/Qwen-2.5-VL-Instruct-7B-Pairwise-DFJ") == "pairwise"
    assert mode_from_name("/x/qwen-2.5-vl-instruct-3b-pointwise-dfj/") == "pointwise"
    assert mode_from_name("/models/my-judge") is None


@pytest.mark.slow
def test_mode_comes_from_manifest_then_argument_then_name(tiny, tmp_path):
    model = tiny("pointwise")
    assert resolve(model).mode == "pointwise"
    with pytest.raises(ValueError, match="is a pointwise judge"):
        resolve(model, mode="pairwise")
    bare = tmp_path / "judge"
    shutil.copytree(model, bare)
    (bare / "dfj.json").unlink()
    with pytest.raises(ValueError, match="pass mode='pointwise' or mode='pairwise'"):
        resolve(bare)
    assert resolve(bare, mode="pairwise").mode == "pairwise"
    named = tmp_path / "Qwen-2.5-VL-Instruct-7B-Pairwise-DFJ"
    bare.rename(named)
    assert resolve(named).mode == "pairwise"
    with pytest.raises(ValueError, match="unknown judge mode"):
        resolve(named, mode="listwise")


@pytest.mark.slow
def test_hugging_face_id_from_the_offline_cache(tiny, tmp_path, monkeypatch):
    """A hub id loads through the normal HF cache; offline, from the cache alone; mode from the name."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny("pointwise"), snapshot)
    (snapshot / "dfj.json").unlink()  # a hub checkpoint has no dfj manifest
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = resolve(HUB_ID)
    assert source.kind == "model" and source.mode == "pointwise" and source.path == snapshot
    judge = dfj.load_judge(HUB_ID, max_new_tokens=4)
    assert judge.mode == "pointwise" and judge.source == HUB_ID
    with pytest.raises(ArtifactError, match="not available from the Hugging Face cache"):
        resolve("MBZUAI/Qwen-2.5-VL-Instruct-7B-Pairwise-DFJ")


def test_missing_and_non_judge_sources(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ArtifactError, match="neither a model folder"):
        resolve(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ArtifactError, match="must be a folder"):
        resolve(tmp_path / "file.txt")


@pytest.mark.slow
def test_adapter_names_its_base_relative_or_absolute(tiny, tmp_path):
    import json

    root = tmp_path / "copy"
    shutil.copytree(tiny("pointwise", adapter=True).parent, root)
    config_path = root / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(config))
    (root / "adapter" / "dfj.json").unlink()
    source = resolve(root / "adapter", mode="pointwise")
    assert source.kind == "adapter" and source.base == (root / "base").resolve()
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="base model .* was not found"):
        resolve(root / "adapter", mode="pointwise")


@pytest.mark.slow
def test_artifact_from_another_prompt_template_warns(tiny, tmp_path):
    from dfj.manifest import write_manifest, read_manifest

    model = tmp_path / "m"
    shutil.copytree(tiny("pairwise"), model)
    manifest = read_manifest(model)
    manifest.prompt_templates["pairwise"] = "0" * 64
    write_manifest(model, manifest)
    with pytest.warns(UserWarning, match="different pairwise prompt template"):
        dfj.load_judge(str(model), max_new_tokens=2)
