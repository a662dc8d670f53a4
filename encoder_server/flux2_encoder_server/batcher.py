"""Dynamic batching: concurrent requests merged into model batches on one worker thread.

Requests queue up as jobs; the worker takes prompts from the head of the queue in FIFO order until the
batch holds `max_batch_prompts` prompts (every prompt is padded to max_length tokens, so this is the
token budget) or `max_wait` has passed since the first one arrived. A job whose caller cancelled or whose
deadline passed is dropped before it costs model time. A job larger than one batch is spread over
several. An exception inside a batch fails only the jobs in that batch. Each job is resolved the moment
the batch holding its last prompt is done, whatever else is still queued.

Pipelining: `encode` may return the rows, or a handle (`PendingBatch`) whose `result()` waits for them.
With a handle the worker forms and launches the next batch while the device still runs this one, and a
second thread waits for each handle in launch order and answers its callers; at most `pipeline_depth`
batches are launched and not yet answered. So the device does not idle while the host tokenizes, answers
callers or waits for the GIL between batches.

Tasks: besides prompt batches the worker runs whole model calls queued with `run_task` (prompt upsampling:
one `generate` per request), each alone on the worker thread, in FIFO order, with their own queue limit.
While both kinds wait, `task_share` of the worker's turns go to tasks (0.25: one task, then three batches),
so a burst of tasks cannot starve encoding, nor a flood of prompts the tasks. A task runs after the
batches already launched (the device runs them in order) and is answered from the worker thread itself.
A running task also shares its own time: it calls `should_stop()` between its steps (each generated
token), and there, once it has run `task_slice_s` while prompts wait, the worker runs queued prompt batches
for `(1 - task_share) / task_share` times that long before the task goes on. Without it one 256-token
generation held the model for ~12 s and encoding fell to about a third of its rate (H200, docs/benchmarks.md).

Filling while the device is busy: when a pipeline slot frees while an earlier batch still holds the device,
the next batch need not go now; it keeps filling (up to `max_batch_prompts`) until the device is expected to
finish the batches already launched within `launch_lead_s`, then goes. The device's time per prompt is the
fastest of the last answered batches (an optimistic estimate launches early rather than leave the device
idle). Without it, in a closed loop of clients (each sends again once answered) the first answered client's
next request could go alone 5 ms after it arrived with the others queued behind it, and small batches cost
the device up to twice the time per prompt (61-64 ms at 2 prompts vs 31 at 32 on an H200). Measured on the
H200 at 32 clients the served rate was the same with and without it (docs/benchmarks.md); at 64 clients it
ran full batches. With nothing launched, a batch waits at most `max_wait` as before, so a lone request's
latency is unchanged.

Balancing (`balance_batches`, on by default): while batches are launched, the next one holds at most
1/`pipeline_depth` of the prompts queued and launched (rounded up). A closed loop of N clients with two
batches in flight runs in two groups whose sizes otherwise stay whatever they first were (2 and 30 at 32
clients, seen with both FLUX.2-dev's Mistral and Klein's Qwen3 on an H200); small batches cost the device up
to twice the time per prompt, and each group waits for the other. With the cap the groups even out within a
cycle: a Klein 4B encoder at 32 clients served 106.7 / 122.7 completions/s (one / four front-end processes)
with it against 85.3 / 85.7 without, in batches of 16 (docs/benchmarks.md). The cost: under an open load
that just rose, a batch can be smaller than the queue would allow.

Tokenizing ahead: with `prepare` and `launch_prepared` (the engine's `tokenize_rows` / `launch_rows`), a
third thread turns each queued request's prompts into model inputs as it arrives, in queue order, so the
worker finds batch n+1 already tokenized while batch n runs and only stacks rows and launches. Every prompt
is padded to max_length on its own (diffusers' recipe), so a row does not depend on the batch it ends up in.

The worker threads must outlive any single failure: everything it does per batch is guarded, and
results are handed to the callers' event loops with `call_soon_threadsafe` (a loop that has gone away
is ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Protocol

import torch

from .errors import DeadlineExceeded, EncodeFailed, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class PendingBatch(Protocol):
    def result(self) -> torch.Tensor: ...


#: The rows of a batch, or a handle to them while the device computes them.
EncodeFn = Callable[[list[str]], "torch.Tensor | PendingBatch"]


@dataclass
class _Job:
    prompts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float | None  # time.monotonic() value
    enqueued_at: float = field(default_factory=time.monotonic)
    next_row: int = 0  # first prompt not yet handed to a batch
    rows: list[torch.Tensor | None] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    started_at: float | None = None  # when its first batch went to the model
    encode_seconds: float = 0.0  # model time of the batches it was in
    #: Model inputs for its prompts, one per prompt (`prepare`), once `prepared_event` is set.
    prepared: list[object] | None = None
    prepared_event: threading.Event = field(default_factory=threading.Event)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class _Task:
    """A model call run alone on the worker thread: `run(should_stop)` (should_stop() turns true once the
    caller is gone or its deadline passed, so a long call can end early)."""

    run: Callable[[Callable[[], bool]], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float | None
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    run_seconds: float = 0.0
    #: When the task last started (or went back to) its own work, and the time it gave to prompt batches.
    slice_started: float = 0.0
    yielded_seconds: float = 0.0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired(time.monotonic())


@dataclass(frozen=True)
class TaskResult:
    """What `Batcher.run_task` returns: the task's value, and where the request spent its time."""

    value: object
    queue_seconds: float
    run_seconds: float


@dataclass(frozen=True)
class _Launched:
    """A batch handed to the model, waiting for its rows."""

    batch: list[tuple[_Job, int, int]]
    prompts: list[str]
    handle: torch.Tensor | PendingBatch
    started: float


@dataclass(frozen=True)
class Encoded:
    """What `Batcher.submit` returns: the rows, and where the request spent its time."""

    embeds: torch.Tensor
    queue_seconds: float  # queued until its first batch started
    encode_seconds: float  # in the model (summed over the batches it was spread over)


@dataclass(frozen=True)
class BatchStats:
    """What one model batch held, for metrics."""

    prompts: int
    jobs: int
    queue_seconds: float
    encode_seconds: float
    failed: bool = False


class Batcher:
    def __init__(
        self,
        encode: EncodeFn,
        max_batch_prompts: int = 16,
        max_wait_s: float = 0.005,
        max_queued_requests: int = 256,
        pipeline_depth: int = 2,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        max_queued_tasks: int = 16,
        task_share: float = 0.25,
        task_slice_s: float = 0.1,
        prepare: Callable[[list[str]], list[object]] | None = None,
        launch_prepared: Callable[[list[object]], torch.Tensor | PendingBatch] | None = None,
        launch_lead_s: float | None = 0.05,
        balance_batches: bool = True,
    ):
        if not 0 < task_share <= 1:
            raise ValueError(f"task_share must be in (0, 1], got {task_share}")
        if (prepare is None) != (launch_prepared is None):
            raise ValueError("prepare and launch_prepared go together")
        self._encode = encode
        self._prepare = prepare
        self._launch_prepared = launch_prepared
        self._to_prepare: SimpleQueue[_Job | None] = SimpleQueue()
        self.max_queued_tasks = max_queued_tasks
        self.task_share = task_share
        self.task_slice_s = task_slice_s
        self._tasks: deque[_Task] = deque()
        self._task_credit = 0.0
        self.max_batch_prompts = max_batch_prompts
        self.max_wait_s = max_wait_s
        self.max_queued_requests = max_queued_requests
        self._on_batch = on_batch
        self._on_drop = on_drop
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be at least 1, got {pipeline_depth}")
        self.pipeline_depth = pipeline_depth
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._slots = threading.Semaphore(pipeline_depth)
        self._launched: SimpleQueue[_Launched | None] = SimpleQueue()
        self._last_finished = 0.0
        # Batches launched and not yet answered, as (launched at, prompts): what filling while the device is
        # busy (launch_lead_s; None: off) and balancing wait on; and the device's recent seconds per prompt.
        self.launch_lead_s = launch_lead_s
        self.balance_batches = balance_batches
        self._in_flight: deque[tuple[float, int]] = deque()
        self._recent_s_per_prompt: deque[float] = deque(maxlen=8)
        self._thread = threading.Thread(target=self._run, name="encoder-worker", daemon=True)
        self._answerer = threading.Thread(target=self._answer_loop, name="encoder-answerer", daemon=True)
        self._preparer: threading.Thread | None = None
        if prepare is not None:
            self._preparer = threading.Thread(target=self._prepare_loop, name="encoder-tokenizer", daemon=True)
            self._preparer.start()
        self._thread.start()
        self._answerer.start()

    @property
    def alive(self) -> bool:
        """Both worker threads run (a closed batcher's threads end on purpose and count as alive)."""
        preparing = self._preparer is None or self._preparer.is_alive()
        return self._closed or (self._thread.is_alive() and self._answerer.is_alive() and preparing)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def queued_tasks(self) -> int:
        with self._cond:
            return len(self._tasks)

    async def run_task(self, run: Callable[[Callable[[], bool]], object], timeout: float | None = None) -> TaskResult:
        """Run `run(should_stop)` alone on the worker thread, in turn with the batches (see the module
        docstring). Raises ResourceExhausted at once when max_queued_tasks wait, DeadlineExceeded when
        `timeout` passes first, Unavailable when closing, and whatever `run` raised."""
        loop = asyncio.get_running_loop()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline passed before the request was queued")
        task = _Task(run, loop, loop.create_future(), deadline=None if timeout is None else time.monotonic() + timeout)
        with self._cond:
            if self._closed:
                raise Unavailable("server is shutting down")
            if len(self._tasks) >= self.max_queued_tasks:
                raise ResourceExhausted(
                    f"queue full: {len(self._tasks)} upsampling requests waiting "
                    f"(upsample_max_queued_requests={self.max_queued_tasks})"
                )
            self._tasks.append(task)
            self._cond.notify()
        try:
            done, _ = await asyncio.wait({task.future}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancelled.set()
            self._forget_task(task)
            task.future.cancel()
            raise
        if not done:
            task.cancelled.set()
            self._forget_task(task)
            task.future.cancel()
            raise DeadlineExceeded(f"deadline of {timeout:.3f}s passed before the request was answered")
        value = task.future.result()
        started = task.started_at if task.started_at is not None else task.enqueued_at
        return TaskResult(value, started - task.enqueued_at, task.run_seconds)

    def _forget_task(self, task: _Task) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def submit(self, prompts: list[str], timeout: float | None = None) -> Encoded:
        """Encode `prompts` into (len(prompts), L, D).

        Raises ResourceExhausted at once when the queue is full, DeadlineExceeded when `timeout` seconds
        pass first (the request is then dropped before the model sees the rest of it), Unavailable when
        the batcher is closing, EncodeFailed when the model raised on one of its batches.
        """
        loop = asyncio.get_running_loop()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline passed before the request was queued")
        job = _Job(
            prompts=list(prompts),
            loop=loop,
            future=loop.create_future(),
            deadline=None if timeout is None else time.monotonic() + timeout,
        )
        job.rows = [None] * len(job.prompts)
        with self._cond:
            if self._closed:
                raise Unavailable("server is shutting down")
            if len(self._queue) >= self.max_queued_requests:
                raise ResourceExhausted(
                    f"queue full: {len(self._queue)} requests waiting (max_queued_requests={self.max_queued_requests})"
                )
            self._queue.append(job)
            if self._prepare is not None:
                self._to_prepare.put(job)
            self._cond.notify()
        try:
            done, _ = await asyncio.wait({job.future}, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(job)  # the caller went away: the worker skips it; its queue slot frees now
            raise
        if not done:
            self._abandon(job)
            raise DeadlineExceeded(f"deadline of {timeout:.3f}s passed before the request was encoded")
        embeds = job.future.result()
        started = job.started_at if job.started_at is not None else job.enqueued_at
        return Encoded(embeds, started - job.enqueued_at, job.encode_seconds)

    def _abandon(self, job: _Job) -> None:
        job.cancelled.set()
        self._forget(job)
        job.future.cancel()

    def close(self) -> None:
        """Stop taking jobs; fail the queued ones; let the running batch finish."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            tasks = list(self._tasks)
            self._tasks.clear()
            self._cond.notify_all()
        self._to_prepare.put(None)
        for job in pending:
            self._fail(job, Unavailable("server is shutting down"))
        for task in tasks:
            self._fail(task, Unavailable("server is shutting down"))

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._thread.join(timeout)
        self._answerer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- worker thread ------------------------------------------------------------------------------
    def _forget(self, job: _Job) -> None:
        with self._cond, contextlib.suppress(ValueError):  # already taken by the worker
            self._queue.remove(job)

    def _take_work(self) -> list[tuple[_Job, int, int]] | _Task | None:
        """Block until work is available; return the next task, or (job, first_row, end_row) slices for one
        batch (an empty list when every queued job had been dropped)."""
        with self._cond:
            while not self._queue and not self._tasks and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            if self._tasks and self._task_turn():
                return self._tasks.popleft()
            return self._take_batch()

    def _task_turn(self) -> bool:
        """Whether this turn goes to a task: always when no prompts wait, else `task_share` of the turns
        (under the lock)."""
        if not self._queue:
            return True
        self._task_credit += self.task_share
        if self._task_credit >= 1.0:
            self._task_credit -= 1.0
            return True
        return False

    def _take_batch(self) -> list[tuple[_Job, int, int]]:
        """(job, first_row, end_row) slices for one batch (under the lock, prompts queued)."""
        first_arrival = self._queue[0].enqueued_at
        while True:
            waiting = sum(len(j.prompts) - j.next_row for j in self._queue)
            go_at = max(first_arrival + self.max_wait_s, self._device_free_at() - (self.launch_lead_s or 0.0))
            remaining = go_at - time.monotonic()
            if waiting >= self.max_batch_prompts or remaining <= 0 or self._closed:
                break
            self._cond.wait(remaining)
        batch: list[tuple[_Job, int, int]] = []
        room = self.max_batch_prompts
        if self.balance_batches and self._in_flight:
            launched = sum(prompts for _, prompts in self._in_flight)
            room = min(room, -(-(waiting + launched) // self.pipeline_depth))
        now = time.monotonic()
        while self._queue and room > 0:
            job = self._queue[0]
            if job.cancelled.is_set() or job.expired(now):
                self._queue.popleft()
                self._drop(job, now)
                continue
            take = min(room, len(job.prompts) - job.next_row)
            batch.append((job, job.next_row, job.next_row + take))
            job.next_row += take
            room -= take
            if job.next_row == len(job.prompts):
                self._queue.popleft()
        return batch

    def _device_free_at(self) -> float:
        """When the device is expected to finish the batches launched and not yet answered (a time.monotonic()
        value; 0.0 when none are, or with filling off or no estimate yet). Under the lock."""
        if self.launch_lead_s is None or not self._in_flight or not self._recent_s_per_prompt:
            return 0.0
        per_prompt = min(self._recent_s_per_prompt)
        free_at = self._last_finished
        for launched_at, prompts in self._in_flight:
            free_at = max(free_at, launched_at) + per_prompt * prompts
        return free_at

    def _drop(self, job: _Job, now: float) -> None:
        if job.cancelled.is_set():
            reason = "cancelled"
        else:
            reason = "deadline"
            self._fail(job, DeadlineExceeded("deadline passed while the request was queued"))
        if self._on_drop:
            try:
                self._on_drop(reason)
            except Exception:
                log.exception("drop callback failed")
        log.debug("dropped a queued request (%s)", reason)

    def _run(self) -> None:
        try:
            while True:
                # A free pipeline slot first, then the batch: prompts that arrive while the device is
                # busy still make it into the next batch.
                self._slots.acquire()
                try:
                    work = self._take_work()
                except Exception:  # never let the worker die: every later request would hang
                    log.exception("batcher: could not form a batch")
                    self._slots.release()
                    time.sleep(0.01)
                    continue
                if work is None:
                    return
                if isinstance(work, _Task):
                    try:
                        self._run_task(work)
                    finally:
                        self._slots.release()
                elif work:
                    self._launch(work)
                else:
                    self._slots.release()
        finally:
            self._launched.put(None)

    def _launch(self, batch: list[tuple[_Job, int, int]]) -> None:
        launched = self._start(batch)
        if launched is None:
            self._slots.release()
        else:
            with self._cond:
                self._in_flight.append((launched.started, len(launched.prompts)))
            self._launched.put(launched)

    def _start(self, batch: list[tuple[_Job, int, int]]) -> _Launched | None:
        """Hand one batch to the model; None (the batch failed) when that raised."""
        prompts = [p for job, start, end in batch for p in job.prompts[start:end]]
        started = time.monotonic()
        for job, _, _ in batch:
            if job.started_at is None:
                job.started_at = started
        try:
            if self._launch_prepared is not None:
                handle = self._launch_prepared([x for job, a, b in batch for x in self._prepared(job)[a:b]])
            else:
                handle = self._encode(prompts)
        except Exception as exc:
            self._fail_batch(batch, prompts, exc)
            return None
        return _Launched(batch, prompts, handle, started)

    # -- tokenizer thread ---------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        while (job := self._to_prepare.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    job.prepared = self._prepare(job.prompts)  # type: ignore[misc]
            except Exception:  # the worker tokenizes it again and fails its batch with the error
                log.exception("batcher: tokenizing ahead failed")
            finally:
                job.prepared_event.set()

    def _prepared(self, job: _Job) -> list[object]:
        """The job's model inputs: from the tokenizer thread (which runs in queue order, so this waits at
        most for the jobs queued before it), else made here."""
        assert self._prepare is not None
        while not job.prepared_event.wait(0.1):
            if self._preparer is None or not self._preparer.is_alive():
                break
        if job.prepared is None:
            job.prepared = self._prepare(job.prompts)
        return job.prepared

    def _between_task_steps(self, task: _Task) -> bool:
        """The `should_stop` a running task calls between its steps: first lets queued prompt batches run
        when the task has had its share (see the module docstring), then says whether the task should end."""
        now = time.monotonic()
        if self._queue and now - task.slice_started >= self.task_slice_s and not self._closed:
            self._run_batches_for(task, (now - task.slice_started) * (1 - self.task_share) / self.task_share)
        return task.should_stop()

    def _run_batches_for(self, task: _Task, seconds: float) -> None:
        """On the worker thread, inside a running task: run queued prompt batches one at a time (launch, wait,
        answer) for about `seconds`. The task holds one pipeline slot; taking the others first waits until
        every batch launched before the task is answered, so a job's rows are never written by two threads."""
        began = time.monotonic()
        others = self.pipeline_depth - 1
        for _ in range(others):
            self._slots.acquire()
        try:
            while time.monotonic() - began < seconds:
                with self._cond:
                    if not self._queue or self._closed:
                        break
                    batch = self._take_batch()
                if batch and (launched := self._start(batch)) is not None:
                    self._answer(launched)
        except Exception:  # never let a batch's trouble break the task that lent its time
            log.exception("batcher: running prompt batches inside a task failed")
        finally:
            for _ in range(others):
                self._slots.release()
            task.slice_started = time.monotonic()
            task.yielded_seconds += task.slice_started - began

    def _run_task(self, task: _Task) -> None:
        now = time.monotonic()
        if task.cancelled.is_set() or task.expired(now):
            if not task.cancelled.is_set():
                self._fail(task, DeadlineExceeded("deadline passed while the request was queued"))
            if self._on_drop:
                try:
                    self._on_drop("cancelled" if task.cancelled.is_set() else "deadline")
                except Exception:
                    log.exception("drop callback failed")
            return
        task.started_at = task.slice_started = now
        try:
            value = task.run(lambda: self._between_task_steps(task))
        except Exception as exc:  # the task's own error goes to its caller; the worker carries on
            task.run_seconds = time.monotonic() - now - task.yielded_seconds
            self._fail(task, exc)
            return
        task.run_seconds = time.monotonic() - now - task.yielded_seconds  # its own model time
        self._resolve(task, value)

    def _answer_loop(self) -> None:
        while (launched := self._launched.get()) is not None:
            try:
                self._answer(launched)
            except Exception:  # never let the answerer die either
                log.exception("batcher: answering a batch failed")
            finally:
                with self._cond:
                    if self._in_flight:
                        self._in_flight.popleft()  # answered in launch order
                    self._cond.notify_all()  # a batch filling while the device was busy may go now
                self._slots.release()

    def _answer(self, launched: _Launched) -> None:
        batch, prompts = launched.batch, launched.prompts
        try:
            handle = launched.handle
            embeds = handle if isinstance(handle, torch.Tensor) else handle.result()
            if embeds.shape[0] != len(prompts):
                raise RuntimeError(f"the model returned {embeds.shape[0]} rows for {len(prompts)} prompts")
        except Exception as exc:
            self._fail_batch(batch, prompts, exc)
            return
        finished = time.monotonic()
        # Model time of this batch: from its launch, or from the end of the batch before it that was
        # still running on the device when it was launched.
        started = max(launched.started, self._last_finished)
        self._last_finished = finished
        if prompts:
            with self._cond:  # the worker reads them under the lock
                self._recent_s_per_prompt.append((finished - started) / len(prompts))
        if self._on_batch:
            stats = BatchStats(
                prompts=len(prompts),
                jobs=len({id(job) for job, _, _ in batch}),
                queue_seconds=max(launched.started - job.enqueued_at for job, _, _ in batch),
                encode_seconds=finished - started,
            )
            self._guarded(self._on_batch, stats)
        row = 0
        for job, start, end in batch:
            job.encode_seconds += finished - started
            for i in range(start, end):
                job.rows[i] = embeds[row]
                row += 1
            if end == len(job.prompts) and not job.failed and not job.cancelled.is_set():
                try:
                    # A job wholly inside this batch is one contiguous slice of it; no copy needed.
                    result = embeds[row - end : row] if start == 0 else torch.stack(job.rows)  # type: ignore[arg-type]
                except Exception as exc:  # e.g. out of memory while stacking: fail this job only
                    self._fail(job, EncodeFailed(f"assembling the result failed: {type(exc).__name__}: {exc}"))
                    continue
                self._resolve(job, result)
            if end == len(job.prompts):
                job.rows = []  # drop references to batch rows early

    def _fail_batch(self, batch: list[tuple[_Job, int, int]], prompts: list[str], exc: Exception) -> None:
        log.error("encode failed for a batch of %d prompts", len(prompts), exc_info=exc)
        for job, _, _ in batch:
            job.failed = True
            self._forget(job)
            self._fail(job, EncodeFailed(f"encoding failed: {type(exc).__name__}: {exc}"))
        if self._on_batch:
            self._guarded(self._on_batch, BatchStats(len(prompts), len(batch), 0.0, 0.0, failed=True))

    @staticmethod
    def _guarded(callback: Callable[[BatchStats], None], stats: BatchStats) -> None:
        try:
            callback(stats)
        except Exception:
            log.exception("batch callback failed")

    @staticmethod
    def _resolve(job: _Job | _Task, value: object) -> None:
        def set_result() -> None:
            if not job.future.done():
                job.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody is waiting
            job.loop.call_soon_threadsafe(set_result)

    @staticmethod
    def _fail(job: _Job | _Task, exc: BaseException) -> None:
        def set_exception() -> None:
            if not job.future.done():
                job.future.set_exception(exc)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody is waiting
            job.loop.call_soon_threadsafe(set_exception)
