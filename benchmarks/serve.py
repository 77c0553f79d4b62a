"""The cost of HTTP: `dfj serve` against in-process `Judge` calls on the same records. A benchmark,
not a test.

    python -m benchmarks.serve [--mode pointwise|pairwise] [--records 20] [--clients 4] [--out FILE.json]

The judge is the trained tiny judge of the mode on its runtime (torch, CPU), the records the first
`--records` of its held-out split. In-process: `judge.score` / `judge.compare`, one record at a time.
Over HTTP: a `dfj serve` process on a loopback port, one client posting the same records one at a time
(base64 images, as a remote client sends them). The two are timed in pairs, record by record, for
`--rounds` passes (the order within a pair swapped each pass), so the machine's drift falls on both;
each path judges every record once unmeasured first. Then `--clients` clients post at once (requests
for one image and label queued together are judged in one runtime call). Reports verdicts per second,
p50/p95 latency, and HTTP's overhead on a verdict (mean, and the median of the paired differences).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from benchmarks.report import emit


def _records(mode: str, n: int) -> list[dict[str, Any]]:
    from dfj.data import read_split
    from dfj.tiny import trained_tiny_split

    records = read_split(trained_tiny_split(mode)).records[:n]
    out = []
    for record in records:
        fields = {"label": record.label}
        fields.update({"response": record.response} if mode == "pointwise"
                      else {"response_a": record.response_a, "response_b": record.response_b})
        out.append({"path": record.image, "body": {"image": base64.b64encode(Path(record.image).read_bytes()).decode(), **fields},
                    "fields": fields})
    return out


def _timed(calls: list[Callable[[], Any]]) -> tuple[list[float], list[Any]]:
    seconds, results = [], []
    for call in calls:
        start = time.perf_counter()
        results.append(call())
        seconds.append(time.perf_counter() - start)
    return seconds, results


def _summary(seconds: list[float], wall: float | None = None) -> dict[str, float]:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    total = wall if wall is not None else sum(seconds)
    return {"verdicts_per_s": round(len(seconds) / total, 3), "mean_s": round(statistics.fmean(seconds), 4),
            "p50_s": round(pick(0.5), 4), "p95_s": round(pick(0.95), 4)}


def _start_service(artifact: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dfj.cli", "serve", str(artifact), "--port", str(port),
                             "--log-level", "warning", "--max-queue", "64"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dfj serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("dfj serve did not get ready in 600 s")


def run(mode: str, n: int, clients: int, work: Path, rounds: int = 3) -> dict[str, Any]:
    import httpx

    import dfj
    from dfj.tiny import trained_tiny_judge

    artifact = trained_tiny_judge(mode)
    records = _records(mode, n)
    judge = dfj.load_judge(str(artifact))
    call = judge.score if mode == "pointwise" else judge.compare
    route = "/v1/score" if mode == "pointwise" else "/v1/compare"
    local_calls = [lambda r=r: call(r["path"], *r["fields"].values()).to_dict() for r in records]
    work.mkdir(parents=True, exist_ok=True)
    proc, url = _start_service(artifact, work / "serve.log")
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            http_calls = [lambda r=r: client.post(route, json=r["body"]).json() for r in records]
            _timed(local_calls)  # warm both: caches, allocator, lazy inits
            _timed(http_calls)
            # Paired and interleaved (in-process then HTTP on each record, the order swapped every
            # round), so drift in the machine's speed falls on both alike.
            local_s, http_s, local, remote = [], [], [], []
            for round_ in range(rounds):
                for local_call, http_call in zip(local_calls, http_calls):
                    pair = [(local_call, local_s, local), (http_call, http_s, remote)]
                    for fn, seconds, results in (pair if round_ % 2 == 0 else pair[::-1]):
                        taken, [result] = _timed([fn])
                        seconds += taken
                        results.append(result)

            def one(r: dict[str, Any]) -> float:
                with httpx.Client(base_url=url, timeout=600) as own:
                    start = time.perf_counter()
                    answer = own.post(route, json=r["body"])
                    answer.raise_for_status()
                    return time.perf_counter() - start

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                concurrent_s = list(pool.map(one, records))
            concurrent_wall = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    mismatches = sum(a != b for a, b in zip(local, remote))
    local_summary, http_summary = _summary(local_s), _summary(http_s)
    return {
        "mode": mode, "records": n, "rounds": rounds, "clients": clients, "runtime": judge.runtime_name, "cpus": os.cpu_count(),
        "in_process": local_summary, "http": http_summary,
        "http_concurrent": _summary(concurrent_s, concurrent_wall),
        "http_overhead_mean_s": round(http_summary["mean_s"] - local_summary["mean_s"], 4),
        "http_overhead_share": round(http_summary["mean_s"] / local_summary["mean_s"] - 1, 4),
        # The same record's HTTP time less its in-process time, per pair: drift cancels out.
        "http_overhead_median_pair_s": round(statistics.median(h - l for h, l in zip(http_s, local_s)), 4),
        "verdicts_differ": mismatches,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pointwise", "pairwise"), default="pointwise")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the records, in-process and HTTP interleaved")
    parser.add_argument("--work", type=Path, default=Path("bench-serve"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.mode, args.records, args.clients, args.work, args.rounds)
    emit(result, args.out)


if __name__ == "__main__":
    main()
