"""`dfj judge --engine ray` on one local Ray instance (num_cpus=2) shared by these tests: the same file
as a local run, byte for byte, with bad records; an actor killed mid-run; the driver killed mid-run
and resumed; a worker that sees another artifact refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra installs ray")

from batch_parity import shuffled_split  # noqa: E402
from kill_points import kill_env  # noqa: E402

ACTOR_TITLE = "UnitJudge)"  # in the process title Ray gives the map workers: MapBatches(…UnitJudge)
BAD_LINES = [b'{"image": "images/none.png", "label": "fake", "response": "r"}', b"{not json",
             b'{"image": "IMAGE", "label": "genuine", "response": "r"}', "\ufeff".encode() + b"[]"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _input(mode: str, folder: Path, n: int) -> Path:
    """The first `n` held-out records in shuffled runs of one image (a blank response inside one), and
    bad lines among them: a missing image, a malformed line, an unknown label, a JSON array."""
    from dfj.tiny import trained_tiny_split

    data, _ = shuffled_split(trained_tiny_split(mode), folder, n)
    lines = data.read_bytes().splitlines()
    image = json.loads(lines[0])["image"].encode()
    for offset, bad in enumerate(BAD_LINES):
        lines.insert(3 + 5 * offset, bad.replace(b"IMAGE", image))
    data.write_bytes(b"\n".join(lines) + b"\n")
    return data


@pytest.fixture(scope="module")
def runs(module_dir, judges):
    """Per mode: (input file, the local run's output bytes)."""
    from dfj.batch import judge_jsonl
    from dfj.tiny import trained_tiny_judge

    made = {}
    for mode, n in (("pointwise", 30), ("pairwise", 40)):
        folder = module_dir(f"ray-{mode}")
        data = _input(mode, folder, n)
        judge_jsonl(judges(trained_tiny_judge(mode)), data, folder / "local.jsonl")
        made[mode] = (data, (folder / "local.jsonl").read_bytes())
    return made


def _load(mode: str):
    from dfj.distributed import JudgeLoad
    from dfj.tiny import trained_tiny_judge

    return JudgeLoad(str(trained_tiny_judge(mode)))


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_the_ray_engine_writes_the_local_runs_file_byte_for_byte(mode, cluster, runs, tmp_path):
    from dfj.distributed import RaySpec, judge

    data, local = runs[mode]
    summary = judge(_load(mode), data, tmp_path / "ray.jsonl", engine=RaySpec(actors=2))
    assert (tmp_path / "ray.jsonl").read_bytes() == local
    rows = [json.loads(line) for line in local.splitlines()]
    assert summary.lines == len(rows) and summary.errors == sum("text" not in r["dfj"] for r in rows) >= len(BAD_LINES) + 1
    assert summary.judged == sum(r["dfj"]["error"] is None for r in rows)


def _actor_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ACTOR_TITLE in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


class GatedUnitJudge:
    """The map workers' class with a gate: an actor judges its first unit, then, before each later one,
    says it waits (a file named after its process) and waits for the gate file. The run cannot end before
    the test opens the gate, however fast the machine, so an actor is killed mid-run. Sent to the actors by
    value (its module is not on their path)."""

    gate = ""  # the gate file, set before the run; actors waiting at it write GATE.waiting-PID

    def __init__(self, *args, **kwargs) -> None:
        from dfj.distributed.raydata import UnitJudge

        self.inner = UnitJudge(*args, **kwargs)
        self.units = 0

    def __call__(self, batch):
        import time as clock

        if self.units:
            open(f"{self.gate}.waiting-{os.getpid()}", "w").close()
            while not os.path.exists(self.gate):
                clock.sleep(0.01)
        self.units += 1
        return self.inner(batch)


def test_an_actor_killed_mid_run_loses_no_line_and_writes_none_twice(cluster, runs, tmp_path, monkeypatch):
    import ray.cloudpickle

    import dfj.distributed.raydata as raydata
    from dfj.distributed import RaySpec, judge

    data, local = runs["pointwise"]
    out = tmp_path / "ray.jsonl"
    GatedUnitJudge.gate = str(tmp_path / "open")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(raydata, "UnitJudge", GatedUnitJudge)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = judge(_load("pointwise"), data, out, engine=RaySpec(actors=2))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Both actors load and judge a unit each, then wait at the gate: the run is certainly mid-run.
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("open.waiting-*"))) < 2 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = {int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("open.waiting-*")}
        assert len(waiting) == 2 and waiting == _actor_pids() and _lines(out) < local.count(b"\n"), (waiting, outcome)
        victim = min(waiting)
        os.kill(victim, signal.SIGKILL)
    finally:
        Path(GatedUnitJudge.gate).touch()
        thread.join(600)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert out.read_bytes() == local
    assert not Path(f"/proc/{victim}").exists()


def test_a_killed_driver_resumes_to_the_same_file(cluster, runs, tmp_path):
    from dfj.tiny import trained_tiny_judge

    data, local = runs["pairwise"]
    out = tmp_path / "ray.jsonl"
    command = [sys.executable, "-m", "dfj.cli", "judge", str(trained_tiny_judge("pairwise")), "--jsonl", str(data),
               "--out", str(out), "--engine", "ray", "--address", cluster, "--actors", "2"]
    # The driver SIGKILLs itself once 5 lines are written (it writes a unit's lines at once): mid-run on any machine.
    driver = subprocess.run(command, env=kill_env("lines:5"), capture_output=True, text=True, timeout=600)
    assert driver.returncode == -signal.SIGKILL, driver.stdout[-2000:] + driver.stderr[-3000:]
    written = _lines(out)
    assert 5 <= written < local.count(b"\n")
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"{written} done by an earlier run" in resumed.stdout
    assert out.read_bytes() == local


def test_a_worker_that_sees_another_artifact_refuses_to_judge(runs, tmp_path):
    from dfj.distributed.raydata import UnitJudge, artifact_fingerprint
    from dfj.manifest import ArtifactError

    load = _load("pointwise")
    assert artifact_fingerprint(load.artifact) == artifact_fingerprint(load.artifact)
    with pytest.raises(ArtifactError, match="is not the artifact the driver checked"):
        UnitJudge(load, "0" * 64, str(runs["pointwise"][0]), False, False)


def test_a_changed_file_changes_the_fingerprint_or_is_refused_where_it_loads(tiny, runs, tmp_path):
    """Without a manifest the fingerprint hashes every file; with one it is the manifest's hash, and
    the worker's load checks every file against that manifest."""
    import shutil

    from dfj.distributed import JudgeLoad
    from dfj.distributed.raydata import UnitJudge, artifact_fingerprint
    from dfj.manifest import ArtifactError

    adapter = tiny("pairwise", adapter=True)
    copy = shutil.copytree(adapter.parent, tmp_path / "judge") / adapter.name  # the adapter and its base
    manifest = copy / "dfj.json"
    before = artifact_fingerprint(copy)
    assert before != artifact_fingerprint(copy.parent / "base")
    _flip_last_byte(copy / "adapter_model.safetensors")
    assert artifact_fingerprint(copy) == before  # the manifest still says what the files must be ...
    with pytest.raises(ArtifactError, match="adapter_model.safetensors"):  # ... and the load holds them to it
        UnitJudge(JudgeLoad(str(copy)), before, str(runs["pairwise"][0]), False, False)
    kept = manifest.read_bytes()
    manifest.unlink()
    without = artifact_fingerprint(copy, "pairwise")
    _flip_last_byte(copy / "adapter_model.safetensors")
    assert artifact_fingerprint(copy, "pairwise") != without
    manifest.write_bytes(kept + b" ")
    assert artifact_fingerprint(copy) != before


def _flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
