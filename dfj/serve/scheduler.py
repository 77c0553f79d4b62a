"""The judge's work queue: one worker thread owns the loaded `Judge`; requests wait in a bounded queue.

- Bounded: `submit` refuses once `max_queue` requests wait (the route answers 503 with Retry-After).
- Nothing runs for nobody: a request given up while queued (its client left, or its deadline passed)
  is taken out of the queue and never run; once every request a running group serves is given up,
  generation stops at its next decode step, and a batch's later groups are skipped.
- Batch-first: single-record requests queued for the same image, label and options are taken
  together and judged as one group (one runtime call, the image encoded once), as a batch request's
  records are; every record still gets its own outcome.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from dfj.groups import GROUP_SIZE, chunk_groups
from dfj.judge import Judge, error_text
from dfj.runtime.base import Cancelled
from dfj.serve.inputs import BadInput, Item, Options
from dfj.serve.metrics import Metrics


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the judge's queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Failure(Exception):
    """A record that could not be judged for a reason other than its input (the runtime failed)."""


Outcome = Any  # a verdict, a BadInput (the record's input), or a Failure


@dataclass(eq=False)
class Work:
    """One request's records, waiting or being judged; `future` gets one outcome per item, in order."""

    items: list[Item | BadInput]
    options: Options
    deadline: float  # time.monotonic() after which nobody waits for it
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    state: str = "queued"  # queued -> running -> done, or abandoned
    abandoned: str | None = None  # why: disconnected / deadline
    arrived: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple | None:
        """The key single-record requests share when they can run as one group."""
        if len(self.items) == 1 and isinstance(self.items[0], Item):
            return (self.items[0].group, self.options.expected_score, self.options.swap_check)
        return None


class Scheduler:
    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self.max_queue = max_queue
        self.metrics = metrics
        self.judge: Judge | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._queue: deque[Work] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_record = 1.0  # moving average, for Retry-After

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, load: Callable[[], Judge], on_load_failed: Callable[[str], None]) -> None:
        """Load the judge and serve the queue, on a thread of its own (the event loop never waits)."""
        def run() -> None:
            try:
                self.judge = load()
            except BaseException as exc:  # noqa: BLE001 - reported, and the service stops
                self.load_error = error_text(exc)
                on_load_failed(self.load_error)
                return
            self.ready.set()
            self.metrics.ready.set(1)
            self._serve()

        self._thread = threading.Thread(target=run, name="dfj-judge", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the event loop's side ----------------------------------------------------------------------
    def submit(self, work: Work) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(work)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def abandon(self, work: Work, reason: str) -> None:
        """Nobody waits for `work` any more: if still queued it leaves the queue unrun; if running, the
        groups of it not yet started are skipped."""
        with self._cond:
            if work.state == "queued":
                self._queue.remove(work)
                work.state = "abandoned"
                self.metrics.queue_depth.set(len(self._queue))
                self.metrics.abandoned.labels(reason, "queued").inc(len(work.items))
            work.abandoned = work.abandoned or reason

    def retry_after(self) -> int:
        with self._cond:  # an RLock: submit calls this holding it; the event loop calls it without
            waiting = sum(len(w.items) for w in self._queue) + 1
        return max(1, min(120, math.ceil(waiting * self._seconds_per_record)))

    # -- the worker's side --------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                works = self._take()
            self._run(works)

    def _take(self) -> list[Work]:
        """The next request, with the queued single-record requests that can share its runtime call."""
        first = self._queue.popleft()
        works = [first]
        key, count = first.group, len(first.items)
        if key is not None:
            for other in list(self._queue):
                if count >= GROUP_SIZE:
                    break
                if other.group == key:
                    self._queue.remove(other)
                    works.append(other)
                    count += 1
        for work in works:
            work.state = "running"
        self.metrics.queue_depth.set(len(self._queue))
        return works

    def _run(self, works: list[Work]) -> None:
        judge = self.judge
        assert judge is not None
        started = time.monotonic()
        outcomes = {id(w): [None] * len(w.items) for w in works}
        pending: list[tuple[Work, int, Any]] = []
        self.metrics.in_flight.set(sum(len(w.items) for w in works))
        for work in works:
            if time.monotonic() > work.deadline:
                work.abandoned = work.abandoned or "deadline"
            for index, item in enumerate(work.items):
                if isinstance(item, BadInput):
                    outcomes[id(work)][index] = item
                    continue
                try:
                    prepared = judge.prepare(item.record, swap_check=work.options.swap_check)
                except (ValueError, OSError) as exc:
                    outcomes[id(work)][index] = BadInput(str(exc))
                except Exception as exc:  # noqa: BLE001 - the record's own failure
                    outcomes[id(work)][index] = Failure(error_text(exc))
                else:
                    pending.append((work, index, prepared))
        judged = 0

        def run_chunk(chunk: list[tuple[Work, int, Any]]) -> None:
            nonlocal judged
            live = [entry for entry in chunk if entry[0].abandoned is None]
            for work, index, _ in chunk:
                if work.abandoned is not None:
                    self.metrics.abandoned.labels(work.abandoned, "running").inc()
            if live:
                owners = {id(work): work for work, _, _ in live}.values()
                # Stops mid-generation once every request this group serves has been given up.
                cancel = lambda: all(w.abandoned is not None for w in owners)  # noqa: E731
                results = judge.run_group([p for _, _, p in live], expected_score=live[0][0].options.expected_score,
                                          cancel=cancel)
                for (work, index, _), result in zip(live, results):
                    if isinstance(result, Cancelled):
                        self.metrics.abandoned.labels(work.abandoned or "deadline", "running").inc()
                        continue
                    outcomes[id(work)][index] = Failure(error_text(result)) if isinstance(result, Exception) else result
                    judged += 1

        for chunk in chunk_groups(pending, key=lambda entry: entry[2].group):
            run_chunk(chunk)
        if judged:
            seconds = (time.monotonic() - started) / judged
            self._seconds_per_record = 0.8 * self._seconds_per_record + 0.2 * seconds
        self.metrics.in_flight.set(0)
        for work in works:
            for outcome in outcomes[id(work)]:
                if outcome is not None:
                    self.metrics.records.labels(_outcome_name(outcome)).inc()
            with self._cond:
                work.state = "done"
            work.loop.call_soon_threadsafe(_resolve, work.future, outcomes[id(work)])


def _outcome_name(outcome: Outcome) -> str:
    if isinstance(outcome, BadInput):
        return "input_error"
    if isinstance(outcome, Failure):
        return "runtime_error"
    return "verdict" if outcome.error is None else "unparsed"


def _resolve(future: asyncio.Future, outcomes: list[Outcome]) -> None:
    if not future.done():
        future.set_result(outcomes)
