"""A real `dfj serve` process on a free loopback port, for the tests that talk to it as its clients do.
It is stopped when its tests are done, and dies with the test process if that dies first."""

from __future__ import annotations

import contextlib
import ctypes
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "dfj-test-key-0123456789abcdef"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Service:
    """One `dfj serve` process and a client for it."""

    def __init__(self, artifact: Path, folder: Path, *args: str, key: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        command = [sys.executable, "-m", "dfj.cli", "serve", str(artifact), "--port", str(self.port), "--log-level", "warning", *args]
        if key:
            (folder / "key").write_text(key + "\n")
            (folder / "key").chmod(0o600)
            command += ["--api-key-file", str(folder / "key")]
        self.log = folder / "serve.log"
        self.proc = subprocess.Popen(command, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        self.health_seen: list[int] = []
        self.client = httpx.Client(base_url=self.url, timeout=300, headers=self.auth())  # a judged request, on any machine

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dfj serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(self.url + "/health", timeout=5).status_code
                self.health_seen.append(status)
                if status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"dfj serve not ready in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> "Service":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for line in self.client.get("/metrics").text.splitlines():
            match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if match is None or match[1] != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match[3])
        return total


