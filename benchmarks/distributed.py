"""Records per second of `dfj judge --engine ray` with 1 and 2 actors, against the local engine, on the
same records. A benchmark, not a test.

    python -m benchmarks.distributed [--mode pointwise|pairwise] [--records 60] [--actors 1 2] [--out FILE.json]

The judge is the trained tiny judge of the mode (torch, CPU), the input the first `--records` lines
of its held-out split. Each engine writes the whole file once; the time includes what a user waits
for: Ray's start, every actor's artifact load, judging, writing. The rate over the last three quarters
of the lines (which leaves the start and the loads aside) is reported too, and each output is checked
to be the local one, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.report import emit


def _timed_run(write: Callable[[], Any], out: Path, total: int) -> dict[str, float]:
    """Seconds to the whole file, and the rate over its last three quarters (from the moment a quarter
    of the lines is out: Ray's start and the actors' loads are behind by then)."""
    quarter: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if out.exists() and out.read_bytes().count(b"\n") >= total / 4:
                quarter.append(time.perf_counter())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.perf_counter()
    watcher.start()
    write()
    end = time.perf_counter()
    done.set()
    lines = out.read_bytes().count(b"\n")
    steady = (lines - lines / 4) / (end - quarter[0]) if quarter and end > quarter[0] else None  # nothing to measure
    return {"seconds": round(end - start, 2), "records_per_s": round(lines / (end - start), 3),
            "last_three_quarters_records_per_s": None if steady is None else round(steady, 3)}


def run(mode: str, records: int, actor_counts: list[int], work: Path) -> dict[str, Any]:
    import ray

    import dfj
    from dfj.batch import judge_jsonl
    from dfj.distributed import JudgeLoad, RaySpec, judge as judge_on_ray
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    work.mkdir(parents=True, exist_ok=True)
    split = trained_tiny_split(mode)
    data = work / "data.jsonl"
    data.write_bytes(b"".join((split / "data.jsonl").read_bytes().splitlines(keepends=True)[:records]))
    if not (work / "images").exists():
        shutil.copytree(split / "images", work / "images")
    artifact = trained_tiny_judge(mode)
    result: dict[str, Any] = {"mode": mode, "records": records, "cpus": os.cpu_count()}

    local_out = work / "local.jsonl"
    start = time.perf_counter()
    judge = dfj.load_judge(str(artifact))
    load_s = time.perf_counter() - start
    result["local"] = {"load_s": round(load_s, 2),
                       **_timed_run(lambda loaded=judge: judge_jsonl(loaded, data, local_out, overwrite=True), local_out, records)}
    del judge
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for actors in actor_counts:
            out = work / f"ray-{actors}.jsonl"
            timing = _timed_run(lambda: judge_on_ray(JudgeLoad(str(artifact)), data, out, engine=RaySpec(actors=actors),
                                                     overwrite=True), out, records)
            timing["same_as_local"] = out.read_bytes() == local_out.read_bytes()
            result[f"ray_{actors}_actors"] = timing
    finally:
        ray.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pointwise", "pairwise"), default="pointwise")
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("bench-distributed"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.mode, args.records, args.actors, args.work)
    emit(result, args.out)


if __name__ == "__main__":
    main()
