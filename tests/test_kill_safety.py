"""Exports killed with SIGKILL at several points leave nothing that loads as an artifact; a rerun works.

The deterministic points are reached by running `dfj export` under a wrapper that SIGKILLs its own
process the moment a given step of the export is reached (no hook in dfj itself); one more kill is
timed on the weights file appearing in the staging folder.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from dfj.manifest import ArtifactError, read_manifest, verify

pytestmark = pytest.mark.slow

# Run `dfj export …` and SIGKILL ourselves at the step named by DFJ_TEST_KILL_AT.
WRAPPER = """
import os, signal, sys
import dfj.export.lora_merge as lora_merge
import dfj.export.staging as staging

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = os.environ["DFJ_TEST_KILL_AT"]
if point == "staging-created":
    original_staged = lora_merge.staged_folder
    import contextlib
    @contextlib.contextmanager
    def staged(*args, **kwargs):
        with original_staged(*args, **kwargs) as work:
            die()
            yield work
    lora_merge.staged_folder = staged
elif point == "manifest-written":
    original_write = lora_merge.write_manifest
    def write(*args, **kwargs):
        result = original_write(*args, **kwargs)
        die()
    lora_merge.write_manifest = write
elif point == "between-renames":
    calls = []
    original_replace = os.replace
    def replace(src, dst):
        calls.append(dst)
        original_replace(src, dst)
        if len(calls) == 2:  # the old artifact set aside, the new one not yet in place
            die()
    staging.os.replace = replace
from dfj.cli import main
main()
"""


def _export(source, out, kill_at=None, force=False):
    command = [sys.executable, "-c", WRAPPER, "export", str(source), "-o", str(out), "--quant", "none"]
    env = {**os.environ, "DFJ_TEST_KILL_AT": kill_at or "none"}
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
    command = [sys.executable, "-m", "dfj.cli", "export", str(source), "-o", str(out), "--quant", "none"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(tmp_path.glob(".artifact.partial-*/*.safetensors")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
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
