"""`dfj judge --engine ray`: the local batch path's units of work, judged by a Ray Data actor pool.

The driver reads the input with dfj's own line reader (the one `dfj judge` uses: 16 MiB line cap,
bad lines kept as lines) and cuts it into the units one local `judge_many` call judges (a run of one
image and label, at most 10 records, bad lines in place). Ray Data gets a dataset of those units'
places in the file (first line, byte offset, line count), one unit a block, and maps it through an
actor pool (`map_batches` with a class): each actor loads the artifact once, after checking it sees
the same artifact as the driver, re-reads its unit from the shared input file, and judges it with the
same `judge_unit` the local path uses, so its output lines are the local run's, byte for byte. The
driver writes the units' lines in input order (`preserve_order`) and flushes each one.

Why not Ray Data's JSON reader: it parses with Arrow and fails the whole read on one malformed line,
and it does not keep a line's bytes, so a bad record could not become a line with its error, and the
output could not carry the input object unchanged.

Failures: Ray Data restarts a killed actor and retries its unit (`max_restarts=-1`,
`max_task_retries=-1`, its defaults for actor pools); a unit's lines reach the output only once its
task has finished, so nothing is lost or written twice (the driver also checks every unit arrives
in order, once). A record that cannot be judged is a line with its error, as locally. A killed driver
takes its actors with it; `--resume` checks the lines written and continues after them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from dfj.batch import BatchSummary, Progress, judge_unit, open_output, prepare_output, read_unit, units
from dfj.distributed.spec import JudgeLoad, RaySpec
from dfj.manifest import ArtifactError
from dfj.provenance import artifact_fingerprint, record_run

INSTALL_HINT = "--engine ray needs the ray extra: pip install 'dfj[ray]'"


class UnitJudge:
    """A Ray Data map worker: one loaded judge, one unit of input lines per call."""

    def __init__(self, load: JudgeLoad, fingerprint: str, source: str, expected_score: bool, swap_check: bool,
                 image_root: str | None = None) -> None:
        import dfj

        seen = artifact_fingerprint(load.artifact, load.mode)
        if seen != fingerprint:
            raise ArtifactError(
                f"{load.artifact} on this worker ({os.uname().nodename}) is not the artifact the driver checked "
                f"(fingerprint {seen[:12]}… here, {fingerprint[:12]}… there): refusing to judge with it")
        self.judge = dfj.load_judge(load.artifact, verify=True, **load.kwargs())
        self.source = Path(source)
        self.image_root = image_root
        self.options = {"expected_score": expected_score, "swap_check": swap_check}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        result: dict[str, list] = {"first": [], "lines": [], "out": [], "judged": [], "unparsed": [], "errors": [], "run": []}
        for first, offset, count in zip(batch["first"], batch["offset"], batch["count"]):
            lines = read_unit(self.source, int(offset), int(first), int(count), self.image_root)
            rows = judge_unit(self.judge, lines, **self.options)
            tally = BatchSummary(out=self.source, lines=len(lines), resumed=0, judged=0, unparsed=0, errors=0)
            for line in lines:
                tally.count(line)
            for key, value in (("first", int(first)), ("lines", len(lines)), ("out", b"".join(rows)),
                               ("judged", tally.judged), ("unparsed", tally.unparsed), ("errors", tally.errors),
                               ("run", json.dumps(self.judge.run, sort_keys=True))):
                result[key].append(value)
        return result


def judge(load: JudgeLoad, source: str | os.PathLike, out: str | os.PathLike, *, engine: RaySpec = RaySpec(),
          resume: bool = False, overwrite: bool = False, progress: Progress | None = None,
          expected_score: bool = False, swap_check: bool = False, image_root: str | os.PathLike | None = None) -> BatchSummary:
    """Judge every line of `source` into `out` on Ray: the file `dfj.batch.judge_jsonl` writes."""
    try:
        import ray
        from ray.data import DataContext
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    load.check(engine)
    source, out, total, done = prepare_output(source, out, resume, overwrite, image_root)
    if Path(load.artifact).exists():  # an absolute path: workers do not share the driver's working folder
        load = dataclasses.replace(load, artifact=str(Path(load.artifact).resolve()))
    fingerprint = artifact_fingerprint(load.artifact, load.mode)
    places = [{"first": unit[0].number, "offset": unit[0].offset, "count": len(unit)} for unit in units(source, done, image_root)]
    summary = BatchSummary(out=out, lines=total, resumed=done, judged=0, unparsed=0, errors=0)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=engine.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # lines go out in input order
        context.enable_progress_bars = False
        with open_output(out, resume, done) as sink:
            if not places:
                return summary
            dataset = ray.data.from_items(places, override_num_blocks=len(places)).map_batches(
                UnitJudge, batch_size=1, compute=ray.data.ActorPoolStrategy(size=engine.actors), num_cpus=engine.cpus_per_actor,
                num_gpus=engine.gpus_per_actor or None,
                fn_constructor_kwargs={"load": load, "fingerprint": fingerprint, "source": str(source),
                                       "expected_score": expected_score, "swap_check": swap_check,
                                       "image_root": str(Path(image_root).resolve()) if image_root else None})
            expected = done + 1
            recorded: set[str] = set()
            for row in dataset.iter_rows():
                if int(row["first"]) != expected:  # Ray Data promised order; a gap or repeat is a bug, not output
                    raise RuntimeError(f"unit starting at line {row['first']} arrived where line {expected} was due")
                if row["run"] not in recorded:  # an actor's run goes to the sidecar before the lines it judged
                    record_run(out, json.loads(row["run"]), load.artifact, source, continuing=done > 0 or bool(recorded),
                               image_root=image_root)
                    recorded.add(row["run"])
                sink.write(row["out"])
                sink.flush()
                expected += int(row["lines"])
                summary.judged += int(row["judged"])
                summary.unparsed += int(row["unparsed"])
                summary.errors += int(row["errors"])
                if progress:
                    progress(expected - 1, total)
            if expected != total + 1:
                raise RuntimeError(f"the run ended after line {expected - 1} of {total}")
    finally:
        if started_here:
            ray.shutdown()
    return summary
