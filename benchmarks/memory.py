"""Peak memory and time of every export and quantization stage on random-weight judges at the released
shapes (a benchmark, not a test): `python -m benchmarks.memory --size 3B`.

Each stage runs in a fresh process whose memory is sampled from /proc every 20 ms:
- `anon`: private (anonymous) resident memory, the memory a stage needs;
- `rss`: all resident memory, which also counts the pages of files the stage maps (safetensors
  read lazily, llama.cpp's memory-mapped GGUF): the kernel can drop those at any time, so they are
  reported, not budgeted.

`--cap-gb N` runs every stage inside a memory cgroup limited to N GB (root, cgroup v1 or v2): the
kernel then charges the stage for everything it holds, anonymous memory and the page cache of the files
it reads and writes, reclaims file pages when the charge reaches N, and kills the stage if what it
cannot give back exceeds N. A stage that finishes under a cap runs on a machine with that much memory;
`cgroup_peak` is the highest charge the kernel recorded, `reclaims` how often the stage hit the cap.

    python -m benchmarks.memory --size 3B --work /tmp/dfj-memory                 # full depth
    python -m benchmarks.memory --size 3B --work /tmp/dfj-memory --cap-gb 4      # ... on a 4 GB budget
    python -m benchmarks.memory --size 7B --text-layers 4 --work /tmp/dfj-memory # 7B, fewer layers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# (stage, input, output, the Python that runs it); paths are relative to the work folder.
STAGES = {
    "merge": ("judge/adapter", "merged", "from dfj.export import export; export(IN, OUT, 'none')"),
    "gguf-f16": ("merged", "gguf-f16", "from dfj.export import export; export(IN, OUT, 'gguf-f16')"),
    "gguf-q4_k_m": ("gguf-f16", "gguf-q4_k_m", "from dfj.quant import quantize; quantize(IN, OUT, 'gguf-q4_k_m')"),
    "onnx-fp32": ("merged", "onnx-fp32", "from dfj.export import export; export(IN, OUT, 'onnx-fp32')"),
    # Calibrated on the trained tiny judges' pointwise training split (built once per machine): real
    # DFJ-shaped inputs; the random judge's quality is not the point, the memory of the loop is.
    "gptq-4bit": ("merged", "gptq-4bit", "from dfj.quant import quantize; from dfj.tiny import trained_tiny_split; "
                  "quantize(IN, OUT, 'gptq-4bit', calibration=trained_tiny_split('pointwise', 'train'), samples=GPTQ_SAMPLES)"),
}
GPTQ_SAMPLES = 16


@dataclass
class Measured:
    seconds: float
    peak_rss: int
    peak_anon: int
    exit_code: int
    output_tail: str
    cap: int | None = None  # the cgroup's limit in bytes, when the stage ran under one
    cgroup_peak: int | None = None  # the highest charge (anonymous + page cache) the kernel recorded
    reclaims: int | None = None  # times the charge reached the cap (v1 failcnt, v2 `max` events)
    oom_kills: int | None = None


class MemoryCap:
    """A memory cgroup for one process tree, limited to `limit` bytes (cgroup v1 `memory` controller, or
    v2 where the memory controller is enabled for children). Needs write access to the hierarchy (root)."""

    def __init__(self, limit: int, name: str):
        self.limit = limit
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").is_file():
            self.version, root = 1, v1
        elif "memory" in _read(v2 / "cgroup.subtree_control").split():
            self.version, root = 2, v2
        else:
            raise RuntimeError("no memory cgroup controller to cap the stage with (cgroup v1 `memory`, or v2 with "
                               "`memory` in /sys/fs/cgroup/cgroup.subtree_control)")
        self.path = root / f"dfj-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir()
        except OSError as error:
            raise RuntimeError(f"cannot create the memory cgroup {self.path}: {error} (run as root)") from error
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        else:
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").is_file():  # absent without swap accounting
                (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the child between fork and exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def readings(self) -> dict[str, int]:
        if self.version == 1:
            oom = dict(line.split() for line in _read(self.path / "memory.oom_control").splitlines())
            return {"cgroup_peak": int(_read(self.path / "memory.max_usage_in_bytes")),
                    "reclaims": int(_read(self.path / "memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in _read(self.path / "memory.events").splitlines())
        peak = _read(self.path / "memory.peak")
        return {"cgroup_peak": int(peak) if peak else 0, "reclaims": int(events.get("max", 0)),
                "oom_kills": int(events.get("oom_kill", 0))}

    def close(self) -> None:
        for _ in range(50):  # the kernel frees the group once its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process in bytes; (0, 0) once it is gone."""
    values = {"VmRSS": 0, "RssAnon": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in values:
                    values[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values["VmRSS"], values["RssAnon"]


def measure(code: str, env: dict[str, str] | None = None, interval: float = 0.02, timeout: float | None = None,
            cap: int | None = None, name: str = "stage") -> Measured:
    """Run `code` in a fresh Python and sample its resident memory until it exits; with `cap` (bytes), inside
    a memory cgroup limited to it."""
    with contextlib.ExitStack() as stack:
        group = None
        if cap is not None:
            group = MemoryCap(cap, name)
            stack.callback(group.close)
        measured = _run_sampled(code, env, interval, timeout, group)
        if group is not None:
            measured.cap = cap
            for key, value in group.readings().items():
                setattr(measured, key, value)
        return measured


def _run_sampled(code: str, env: dict[str, str] | None, interval: float, timeout: float | None,
                 group: MemoryCap | None) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, preexec_fn=group.enter if group else None)
    peaks = [0, 0]
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    while process.poll() is None:
        rss, anon = _status(process.pid)
        peaks = [max(peaks[0], rss), max(peaks[1], anon)]
        if timeout is not None and time.perf_counter() - started > timeout:
            process.kill()
        time.sleep(interval)
    reader.join()
    tail = b"".join(output).decode("utf-8", "replace")[-3000:]
    return Measured(time.perf_counter() - started, peaks[0], peaks[1], process.returncode, tail)


def run(work: Path, size: str, text_layers: int | None, vision_depth: int | None, stages: list[str],
        cap: int | None = None, drop_inputs: bool = False) -> list[dict]:
    from dfj.tiny.full_depth import real_shapes

    text, vision = real_shapes(size, text_layers, vision_depth)
    rows = []
    if not (work / "judge" / "adapter" / "dfj.json").is_file():
        build = (f"from dfj.tiny.full_depth import build_random_judge; "
                 f"build_random_judge({str(work / 'judge')!r}, {text!r}, {vision!r})")
        measured = measure(build)
        if measured.exit_code:
            raise SystemExit(f"building the judge failed:\n{measured.output_tail}")
        rows.append({"stage": "build random judge", **asdict(measured)})
        print(_row(rows[-1]), flush=True)
    for stage in stages:
        source, target, code = STAGES[stage]
        out = work / target
        if (out / "dfj.json").is_file():
            shutil.rmtree(out)
        evict_page_cache(work)
        measured = measure(f"IN, OUT, GPTQ_SAMPLES = {str(work / source)!r}, {str(out)!r}, {GPTQ_SAMPLES}; " + code,
                           cap=cap, name=stage)
        row = {"stage": stage, **asdict(measured)}
        if measured.exit_code == 0:
            manifest = json.loads((out / "dfj.json").read_text())
            row["parity"] = manifest["parity"]
            row["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        rows.append(row)
        print(_row(row), flush=True)
        if measured.exit_code:
            print(measured.output_tail, file=sys.stderr)
            break
        if drop_inputs and not any(STAGES[later][0] == source for later in stages[stages.index(stage) + 1:]):
            # The 7B's base, merge and f16 GGUF (16.6 GB each) do not fit this machine's disk together.
            shutil.rmtree(work / source.split("/")[0])
    return rows


def evict_page_cache(folder: Path) -> None:
    """Write back and drop the cached pages of every file under `folder`. A cgroup is charged for a page
    cache page only when it brings the page in: without this a stage would read its input for free from
    the pages the stage before it wrote, and start with a warm cache no real run has."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _row(row: dict) -> str:
    parity = row.get("parity") or {}
    cosine = f"{parity['cosine']:.6f}" if "cosine" in parity else "–"
    diff = f"{parity['max_abs_diff']:.3g}" if "max_abs_diff" in parity else "–"
    size = f"{row['bytes'] / 1e9:.2f}" if "bytes" in row else "–"
    status = "ok" if row["exit_code"] == 0 else f"exit {row['exit_code']}"
    if row.get("cap") is not None:
        status += (f", cap {row['cap'] / 1e9:.2f} GB: peak charge {row['cgroup_peak'] / 1e9:.2f} GB, "
                   f"{row['reclaims']} reclaims, {row['oom_kills']} OOM kills")
    return (f"| {row['stage']} | {row['peak_anon'] / 1e9:.2f} | {row['peak_rss'] / 1e9:.2f} | {row['seconds']:.0f} | "
            f"{size} | {cosine} | {diff} | {status} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["3B", "7B"], default="3B")
    parser.add_argument("--text-layers", type=int, help="fewer text layers than the released model")
    parser.add_argument("--vision-depth", type=int, help="fewer vision blocks than the released model")
    parser.add_argument("--work", type=Path, default=Path("dfj-memory"))
    parser.add_argument("--stages", nargs="*", default=["merge", "gguf-f16", "gguf-q4_k_m"], choices=list(STAGES))
    parser.add_argument("--cap-gb", type=float, help="run each stage in a memory cgroup limited to this many GB (root)")
    parser.add_argument("--drop-inputs", action="store_true",
                        help="delete a stage's input once no later stage reads it (the 7B needs 50 GB of disk otherwise)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{args.size}, text layers {args.text_layers or 'all'}, vision blocks {args.vision_depth or 'all'}, "
          f"{os.cpu_count()} cores")
    print("| stage | peak anon GB | peak RSS GB | s | output GB | probe cosine | probe max abs diff | |")
    print("|---|---|---|---|---|---|---|---|")
    cap = int(args.cap_gb * 1e9) if args.cap_gb else None
    rows = run(args.work, args.size, args.text_layers, args.vision_depth, args.stages, cap, args.drop_inputs)
    (args.work / "memory.json").write_text(json.dumps({"size": args.size, "text_layers": args.text_layers,
                                                      "vision_depth": args.vision_depth, "cap": cap, "rows": rows},
                                                     indent=2) + "\n")


if __name__ == "__main__":
    main()
