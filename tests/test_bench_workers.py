"""The bench's worker servers: one per runtime, importing its libraries once and forking a worker per
judge, whose memory must still read as a fresh process's."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dfj.bench.forkserver import PRELOAD, WorkerServers
from dfj.bench.worker import STATS, WorkerSpec


def _spec(tmp_path, name: str, source, data) -> tuple:
    cache = tmp_path / name
    cache.mkdir()
    spec = WorkerSpec(source=str(source), role="reference", mode="pairwise", data=str(data), indices=[0, 1],
                      cache=str(cache), runtime="torch")
    spec.write(cache / "spec.json")
    return cache / "spec.json", cache / "worker.log", cache


def test_a_worker_server_outlives_a_failing_worker_and_is_replaced_when_killed(merged, tiny_split, tmp_path):
    data = tiny_split("pairwise", 2)
    with WorkerServers(tmp_path / "logs") as servers:
        lines: list[str] = []
        spec, log, _ = _spec(tmp_path, "missing", tmp_path / "no-such-judge", data)
        assert servers.run("torch", spec, log, lines.append) == 1
        assert "no-such-judge" in log.read_text()  # the worker's own error, in its own log
        first = servers.servers["torch"].pid

        spec, log, cache = _spec(tmp_path, "good", merged("pairwise"), data)
        lines.clear()
        assert servers.run("torch", spec, log, lines.append) == 0
        assert servers.servers["torch"].pid == first and "PROGRESS 2 2\n" in lines
        stats = json.loads((cache / STATS).read_text())
        assert stats["judged_this_run"] == 2 and stats["import_s"] == pytest.approx(servers.import_s["torch"], abs=1e-3)
        assert stats["import_s"] > 0.5 and stats["load_s"] < stats["import_s"] + 30

        # The server killed while its worker runs: the worker's status is lost, so the run is a failure.
        spec, log, _ = _spec(tmp_path, "server-killed", merged("pairwise"), data)
        assert servers.run("torch", spec, log, lambda line: os.kill(first, signal.SIGKILL)) == -1
        assert "worker server exited" in log.read_text()
        spec, log, _ = _spec(tmp_path, "again", merged("pairwise"), data)
        assert servers.run("torch", spec, log, lines.append) == 0 and servers.servers["torch"].pid != first
        running = servers.servers["torch"].pid
        servers.start(["torch", "llamacpp"])  # a running server is kept; a missing one is started and ready
        assert servers.servers["torch"].pid == running and "llamacpp" in servers.import_s
    assert not servers.servers


def test_a_forked_worker_starts_with_the_resident_memory_of_a_fresh_process_after_the_same_imports():
    script = textwrap.dedent("""
        import importlib, json, os
        from dfj.bench.forkserver import PRELOAD, _mapped_file_pages, _touch
        from dfj.runtime import runtime_class

        def resident():
            fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
            return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssFile")}

        runtime_class("torch")
        for module in PRELOAD["torch"]:
            importlib.import_module(module)
        mapped = _mapped_file_pages()
        out = {"server": resident()}
        for touch in (False, True):
            read, write = os.pipe()
            if os.fork() == 0:
                if touch:
                    _touch(mapped)
                os.write(write, json.dumps(resident()).encode())
                os._exit(0)
            os.wait()
            out["touched" if touch else "plain"] = json.loads(os.read(read, 4096))
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    server, plain, touched = out["server"], out["plain"], out["touched"]
    assert server["RssFile"] > 100_000  # kB: torch's libraries, mapped by the imports
    assert plain["RssFile"] < 0.2 * server["RssFile"]  # what a fork alone would report: far less
    assert abs(touched["VmRSS"] - server["VmRSS"]) < 0.03 * server["VmRSS"]


def test_a_worker_server_preloads_only_modules_that_loading_a_judge_imports_anyway(merged, tmp_path):
    """A preloaded module a judge would not import would sit in every worker's memory figure."""
    from dfj.export import export

    onnx = export(merged("pairwise"), tmp_path / "onnx", "onnx-fp32")
    sources = {"torch": merged("pairwise"), "onnx": onnx}
    assert set(PRELOAD) == {"torch", "onnx", "llamacpp"} and PRELOAD["llamacpp"] == ()
    for runtime, source in sources.items():
        script = textwrap.dedent(f"""
            import sys, json
            import dfj
            dfj.load_judge({str(source)!r}, runtime={runtime!r})
            from dfj.bench.forkserver import PRELOAD
            print(json.dumps([m for m in PRELOAD[{runtime!r}] if m not in sys.modules]))
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [], runtime
        assert PRELOAD[runtime]
