"""Exports killed with SIGKILL at several points leave nothing that loads as an artifact; a rerun works.

Each point is reached deterministically, whatever the machine's speed: `dfj export` SIGKILLs its own
process the moment the step is reached, through the tests' kill points (`hooks/sitecustomize.py`; no
hook in dfj itself).
"""

import signal
import subprocess
import sys

import pytest
from kill_points import kill_env

from dfj.manifest import ArtifactError, read_manifest, verify

pytestmark = pytest.mark.slow

def _export(source, out, kill_at=None, force=False):
    command = [sys.executable, "-m", "dfj.cli", "export", str(source), "-o", str(out), "--quant", "none"]
    env = kill_env(kill_at) if kill_at else None
    return subprocess.run(command + (["--force"] if force else []), env=env, capture_output=True, text=True, timeout=600)


def _assert_not_an_artifact(out):
    if not out.exists():
        return
    with pytest.raises(ArtifactError):
        manifest = read_manifest(out)
        verify(out, manifest)


def _assert_clean_rerun(source, out):
    rerun = _export(source, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert verify(out).mode == "pointwise"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers  # the dead writer's partial folder was swept


@pytest.mark.parametrize("point", ["staging-created", "manifest-written"])
def test_killed_export_leaves_no_artifact_and_reruns(tiny, tmp_path, point):
    source = tiny("pointwise", adapter=True)
    out = tmp_path / "artifact"
    killed = _export(source, out, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    assert any(p.name.startswith(".artifact.partial-") for p in tmp_path.iterdir())  # the kill hit mid-export
    _assert_clean_rerun(source, out)


def test_export_killed_while_writing_weights(tiny, tmp_path):
    source = tiny("pointwise", adapter=True)
    out = tmp_path / "artifact"
    killed = _export(source, out, kill_at="weights")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert any(tmp_path.glob(".artifact.partial-*/*.safetensors"))  # killed with a weights file half written
    _assert_not_an_artifact(out)
    _assert_clean_rerun(source, out)


def test_forced_export_killed_between_renames_keeps_no_mixed_folder(tiny, tmp_path):
    source = tiny("pointwise", adapter=True)
    out = tmp_path / "artifact"
    assert _export(source, out).returncode == 0
    killed = _export(source, out, kill_at="between-renames", force=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()  # old set aside, new not in place: nothing half-made at `out`
    _assert_clean_rerun(source, out)
