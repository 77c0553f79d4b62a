"""Deterministic interruptions for the tests. A dfj command run with this folder on PYTHONPATH and
`DFJ_TEST_KILL_AT=<point>` kills itself at that point of its work, in whichever of its processes
reaches it, so a test of what survives a kill never races the machine's speed to get there. Nothing in
dfj knows about this file; without the variable it does nothing. `tests/kill_points.py` sets it up.

Points:
- `lines:N`: `dfj judge --out` (the local batch path or the Ray driver) SIGKILLs itself once N output
  lines are written and flushed (the Ray driver writes a unit's lines at once: N or a few more).
- `bench-verdicts:PREFIX:N`: the bench worker whose cache folder name starts with PREFIX SIGKILLs its
  process group (the bench, its worker servers and itself) once it has written N verdict lines.
- `weights`: `dfj export` SIGKILLs itself with its first weights file half written (its header and
  first tensor on disk, the rest not).
- `staging-created`, `manifest-written`, `between-renames`: `dfj export` SIGKILLs itself once its
  staging folder exists; once the manifest is written there; or with the old artifact set aside and
  the new one not yet in place (`--force`).
"""

import contextlib
import os
import signal

_POINT = os.environ.get("DFJ_TEST_KILL_AT", "")


def _die(group: bool = False) -> None:
    if group:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_lines(count: int) -> None:
    import dfj.batch
    import dfj.distributed.raydata

    class Counting:
        def __init__(self, sink) -> None:
            self.sink, self.lines = sink, 0

        def write(self, data: bytes) -> None:
            self.sink.write(data)
            self.sink.flush()
            self.lines += data.count(b"\n")
            if self.lines >= count:
                _die()

        def flush(self) -> None:
            self.sink.flush()

    for module in (dfj.batch, dfj.distributed.raydata):
        original = module.open_output

        @contextlib.contextmanager
        def open_output(*args, _original=original, **kwargs):
            with _original(*args, **kwargs) as sink:
                yield Counting(sink)

        module.open_output = open_output


def _kill_bench_after_verdicts(prefix: str, count: int) -> None:
    from pathlib import Path

    import dfj.bench.worker as worker

    original = worker._judge_group
    written = [0]

    def judge_group(judge, records, group, spec, cache, reference_rows):
        for row in original(judge, records, group, spec, cache, reference_rows):
            yield row
            # Resumed: the worker has written and flushed the row it was given.
            if Path(cache).name.startswith(prefix):
                written[0] += 1
                if written[0] >= count:
                    _die(group=True)

    worker._judge_group = judge_group


def _kill_mid_weights() -> None:
    import dfj.artifact.checkpoint as checkpoint

    original = checkpoint._write_shard

    def write_shard(path, shard, produce):
        produced = [0]

        def produce_then_die(key):
            produced[0] += 1
            if produced[0] == 2:  # the header and the first tensor are on disk
                _die()
            return produce(key)

        original(path, shard, produce_then_die)

    checkpoint._write_shard = write_shard


def _kill_in_staging(point: str) -> None:
    import dfj.export.lora_merge as lora_merge
    import dfj.artifact.staging as staging

    if point == "staging-created":
        original_staged = lora_merge.staged_folder

        @contextlib.contextmanager
        def staged(*args, **kwargs):
            with original_staged(*args, **kwargs) as work:
                _die()
                yield work

        lora_merge.staged_folder = staged
    elif point == "manifest-written":
        original_write = lora_merge.write_manifest

        def write(*args, **kwargs):
            original_write(*args, **kwargs)
            _die()

        lora_merge.write_manifest = write
    else:
        replaced = []
        original_replace = os.replace

        def replace(src, dst):
            replaced.append(dst)
            original_replace(src, dst)
            if len(replaced) == 2:  # the old artifact set aside, the new one not yet in place
                _die()

        staging.os.replace = replace


if _POINT:
    _name, _, _arg = _POINT.partition(":")
    if _name == "lines":
        _kill_after_lines(int(_arg))
    elif _name == "bench-verdicts":
        _prefix, _, _count = _arg.rpartition(":")
        _kill_bench_after_verdicts(_prefix, int(_count))
    elif _name == "weights":
        _kill_mid_weights()
    elif _name in ("staging-created", "manifest-written", "between-renames"):
        _kill_in_staging(_name)
    else:
        raise SystemExit(f"DFJ_TEST_KILL_AT: unknown point {_POINT!r}")
