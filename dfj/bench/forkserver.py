"""Bench workers forked from one server per runtime, which imports that runtime's libraries once.

Each judge of a bench runs in its own process (`dfj.bench.worker`), so its load time and peak memory
are its own and a crash cannot take the bench down. Starting each from a fresh interpreter made every
torch or ONNX worker import torch and transformers again: about 4 s of a tiny judge's 6 s load, paid
22 times in `dfj demo`. A server per runtime (`python -m dfj.bench.forkserver RUNTIME`) imports the
modules every worker of that runtime imports anyway (`PRELOAD`, no more, so a forked worker's resident
memory is what a fresh one's would be) and forks one worker per judge, one at a time.

A forked child does not inherit the page-table entries of file-backed mappings (Linux maps them again
on first touch), so without help a worker would start without the ~320 MB of torch's shared-library
pages that importing it maps, and report that much less peak memory than a fresh process. The server
records which pages of its file mappings are mapped after the imports (`/proc/self/pagemap`), and each
worker touches them once (about 0.1 s) before it starts: its `VmHWM` then starts where a fresh
process's would after the same imports.

Protocol, one line each: the server says `READY <import seconds>`; the bench sends `[spec, log]` as
JSON; the worker's stdout (its `PROGRESS` lines) passes through; the server ends it with
`EXIT <status>` (negative: killed by that signal). The worker's stderr goes to its log file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

# Modules a worker of each runtime imports while loading any judge (the test suite checks that each
# is in `sys.modules` after a plain load): transformers' processor and Qwen2.5-VL code for torch,
# its processor for ONNX (the tokenizer and image preprocessing are shared). Not peft or GPTQModel:
# only adapters and GPTQ artifacts import them, and a merged judge's memory must not carry them.
PRELOAD: dict[str, tuple[str, ...]] = {
    "torch": ("transformers.models.auto.processing_auto", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"),
    "onnx": ("transformers.models.auto.processing_auto",),
    "llamacpp": (),
}


class WorkerServers:
    """The bench's fork servers, started on first use of a runtime and stopped on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = Path(logs)
        self.servers: dict[str, subprocess.Popen] = {}
        self.import_s: dict[str, float] = {}

    def __enter__(self) -> "WorkerServers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, runtime: str, spec: Path, log: Path, on_line: Callable[[str], None]) -> int:
        """Run one worker; every line it prints goes to `on_line`. Returns its exit status."""
        server = self._server(runtime)
        assert server.stdin is not None and server.stdout is not None
        try:
            server.stdin.write(json.dumps([str(spec), str(log)]) + "\n")
            server.stdin.flush()
        except BrokenPipeError:
            pass  # the server died; its stdout ends below
        for line in server.stdout:
            if line.startswith("EXIT "):
                return int(line.split()[1])
            on_line(line)
        # The server itself is gone (killed, or its interpreter failed): the next worker gets a new one.
        self._stop(runtime)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"the {runtime} worker server exited (log: {self._log(runtime)})\n")
        return -1

    def _log(self, runtime: str) -> Path:
        return self.logs / f"worker-server-{runtime}.log"

    def start(self, runtimes) -> None:
        """Start the servers of `runtimes` that are not running, side by side (each imports on one core),
        and wait until each is ready: nothing is being measured yet."""
        started = [runtime for runtime in sorted(set(runtimes)) if not self._running(runtime)]
        for runtime in started:
            self._launch(runtime)
        for runtime in started:
            self._ready(runtime)

    def _running(self, runtime: str) -> bool:
        server = self.servers.get(runtime)
        return server is not None and server.poll() is None

    def _server(self, runtime: str) -> subprocess.Popen:
        if not self._running(runtime):
            self._launch(runtime)
            self._ready(runtime)
        return self.servers[runtime]

    def _launch(self, runtime: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self._log(runtime), "ab") as log:
            self.servers[runtime] = subprocess.Popen(
                [sys.executable, "-m", "dfj.bench.forkserver", runtime], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, bufsize=1, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def _ready(self, runtime: str) -> None:
        stdout = self.servers[runtime].stdout
        assert stdout is not None
        for line in stdout:  # a library may print on import; the server's own line comes after
            if line.startswith("READY "):
                self.import_s[runtime] = float(line.split()[1])
                return

    def _stop(self, runtime: str) -> None:
        server = self.servers.pop(runtime, None)
        if server is None:
            return
        if server.stdin is not None:
            try:
                server.stdin.close()
            except BrokenPipeError:
                pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    def close(self) -> None:
        for runtime in list(self.servers):
            self._stop(runtime)


def serve(runtime: str) -> None:
    """The server: import, say READY, then fork and wait for one worker per line of stdin."""
    started = time.perf_counter()
    try:
        from dfj.runtime import runtime_class

        runtime_class(runtime)
        for module in PRELOAD.get(runtime, ()):
            importlib.import_module(module)
    except ImportError as exc:  # not an error here: each worker's load reports it with the install hint
        print(f"preload of the {runtime} runtime failed: {exc}", file=sys.stderr, flush=True)
    import_s = time.perf_counter() - started
    mapped = _mapped_file_pages()
    print(f"READY {import_s:.3f}", flush=True)
    for line in sys.stdin:
        spec, log = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _worker(Path(spec), Path(log), import_s, mapped)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


def _worker(spec: Path, log: Path, import_s: float, mapped: list[int]) -> None:
    """In the forked child: the server's file pages mapped again, stderr to the log, stdin from
    /dev/null; run the worker and exit without returning."""
    code = 1
    try:
        _touch(mapped)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        from dfj.bench.worker import WorkerSpec, run

        run(WorkerSpec.read(spec), import_s=import_s)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _mapped_file_pages() -> list[int]:
    """Addresses of the pages of this process's readable file mappings that are mapped now (Linux's
    pagemap "present" bit); empty where pagemap cannot be read."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/") or not parts[1].startswith("r"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
                present = np.nonzero(entries >> np.uint64(63))[0]
                found.append(start + present.astype(np.int64) * page)
    except OSError as exc:
        print(f"cannot read this process's page map ({exc}): workers report memory without shared-library "
              "pages they do not touch", file=sys.stderr, flush=True)
        return []
    return np.concatenate(found).tolist() if found else []


def _touch(addresses: list[int]) -> None:
    import ctypes

    for address in addresses:
        ctypes.c_char.from_address(address).value


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m dfj.bench.forkserver RUNTIME")
    serve(sys.argv[1])
