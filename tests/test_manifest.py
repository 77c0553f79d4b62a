import json

import pytest

from dfj.manifest import ArtifactError, Manifest, read_manifest, verify, write_manifest


def _artifact(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    return write_manifest(tmp_path, Manifest(mode="pairwise", format="safetensors"))


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    manifest = _artifact(tmp_path)
    assert set(manifest.files) == {"a.bin", "sub/b.txt"}
    assert manifest.files["a.bin"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    loaded = read_manifest(tmp_path)
    assert loaded == manifest and loaded.dfj_version and loaded.created
    assert verify(tmp_path) == manifest


def test_changed_missing_and_escaping_files_are_named(tmp_path):
    _artifact(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match="a.bin does not match its checksum"):
        verify(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.txt").unlink()
    with pytest.raises(ArtifactError, match="missing file sub/b.txt"):
        verify(tmp_path)
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "sub" / "planted.py").write_text("import os")
    with pytest.raises(ArtifactError, match="file sub/planted.py is not listed in dfj.json"):
        verify(tmp_path)
    (tmp_path / "sub" / "planted.py").unlink()
    assert verify(tmp_path)
    data = json.loads((tmp_path / "dfj.json").read_text())
    data["files"] = {"../outside": "0" * 64}
    (tmp_path / "dfj.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify(tmp_path)


def test_bad_manifests_are_errors(tmp_path):
    assert read_manifest(tmp_path) is None
    with pytest.raises(ArtifactError, match="no dfj.json"):
        verify(tmp_path)
    (tmp_path / "dfj.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        read_manifest(tmp_path)
    (tmp_path / "dfj.json").write_text(json.dumps({"mode": "listwise", "format": "x"}))
    with pytest.raises(ArtifactError, match="unknown judge mode"):
        read_manifest(tmp_path)


def test_symlinks_are_not_allowed_in_artifacts(tmp_path):
    (tmp_path / "x").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "x")
    with pytest.raises(ArtifactError, match="symbolic links"):
        write_manifest(tmp_path, Manifest(mode="pointwise", format="safetensors"))
