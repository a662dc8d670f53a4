"""Utilities for tests and benchmarks: one server-in-a-thread harness and one configurable fake engine.

The test suite and the benchmarks both import these (as diffusers ships its testing utils), so neither
keeps its own copy of the server's start-up or its own engine double:

    engine = FakeEngine(real_engine)                  # counts batches; can hold them, fail them, time them
    with ServerThread(local_settings(model), lambda _s: engine) as server:
        RemoteTextEncoder(server.target).encode("a prompt")
        assert engine.batches == [["a prompt"]]

`FakeEngine()` without an engine answers with fixed rows of the FLUX.2-dev width or any other (no model:
what the serving benchmarks measure). It needs neither grpc nor a model, so the transport-free core can
be exercised with it alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .families import FAMILIES
from .fingerprint import Fingerprint, make_fingerprint
from .settings import Settings

if TYPE_CHECKING:
    from .core import EncoderCore, Engine
    from .server import EncoderServer, EngineFactory

__all__ = [
    "POISON",
    "BatchRecord",
    "FakeBatch",
    "FakeEngine",
    "ServerThread",
    "WorkerCrash",
    "local_settings",
    "wait_until",
]

#: A prompt containing this makes `FakeEngine` fail the batch holding it.
POISON = "\N{COLLISION SYMBOL}poison"


class WorkerCrash(BaseException):
    """What `FakeEngine.crash_worker()` raises in the batcher's worker thread: not an Exception, so the
    worker's guards let it through and the thread dies, as on an interpreter-level fault."""


def local_settings(model: str = "fake", **overrides: Any) -> Settings:
    """Settings for a server on 127.0.0.1 with free ports, on the CPU, without warm-up and without the idle
    self-test (tests that count what reaches the model must see only their own prompts); `overrides` win."""
    base = Settings(model=model, host="127.0.0.1", port=0, device="cpu", warmup=False, self_test_interval_s=0.0)
    return dataclasses.replace(base, **overrides)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Polls `predicate` (state, not time, is what tests assert; the timeout only stops a hang)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class ServerThread:
    """The real `EncoderServer` (gRPC, and HTTP when the settings enable it) on its own event loop in a
    background thread, built exactly as `flux2-encoder-server serve` builds it.

    `start()` binds and loads (`start(load=False)` leaves it NOT_SERVING; `run(server.load())` later),
    `stop()` drains and ends the loop; also a context manager. `target` is "127.0.0.1:PORT", `http_url`
    "http://127.0.0.1:PORT" when HTTP is on.
    """

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None):
        # Imported here: the fake engine above stays usable where grpc is not installed.
        from .server import EncoderServer, load_engine

        self.server: EncoderServer = EncoderServer(settings, engine_factory or load_engine)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.target = ""
        self.http_url = ""

    @property
    def core(self) -> EncoderCore:
        return self.server.core

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, load: bool = True) -> ServerThread:
        self._thread.start()
        port = self.run(self.server.start())
        self.target = f"127.0.0.1:{port}"
        if self.server.http_port is not None:
            scheme = "https" if self.server.settings.tls_cert else "http"
            self.http_url = f"{scheme}://127.0.0.1:{self.server.http_port}"
        if load:
            self.run(self.server.load())
        return self

    def stop(self, grace: float | None = 0.0) -> None:
        """Drain for up to `grace` seconds (None: the settings' grace period), stop, end the loop thread.
        Stopping twice is harmless."""
        if not self._thread.is_alive():
            return
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclasses.dataclass
class BatchRecord:
    """One batch a FakeEngine ran: its prompts and when (time.perf_counter) it was launched and answered."""

    prompts: list[str]
    launched_at: float
    launch_seconds: float  # host time spent in `launch` (tokenizing, kernel launches)
    finished_at: float | None = None


def _answered() -> torch.Tensor:
    raise RuntimeError("this batch was already answered")


class FakeBatch:
    """What `FakeEngine.launch` returns: the handle whose `result()` the batcher's answering thread waits
    on, as it waits on a real engine's `PendingEmbeds`."""

    def __init__(
        self,
        engine: FakeEngine,
        record: BatchRecord,
        rows: Callable[[], torch.Tensor],
        *,
        fail: bool,
        ready_at: float,
        held: bool,
    ):
        self.prompts = record.prompts
        self._engine = engine
        self._record = record
        self._rows = rows
        self._fail = fail
        self._ready_at = ready_at
        self._released = threading.Event()
        if not held:
            self._released.set()

    def release(self) -> None:
        """Let `result()` return (with `FakeEngine(hold_results=True)` every batch waits for this)."""
        self._released.set()

    def result(self) -> torch.Tensor:
        if not self._released.wait(60):
            raise RuntimeError("the test never released this batch")
        remaining = self._ready_at - time.perf_counter()
        if remaining > 0:  # the imitated device is still running this batch
            time.sleep(remaining)
        if self._fail:
            raise RuntimeError("injected failure")
        rows, self._rows = self._rows(), _answered  # the handle keeps no rows once answered
        self._record.finished_at = time.perf_counter()
        if self._engine.on_rows is not None:
            self._engine.on_rows(self._record.prompts, rows)
        return rows


class FakeEngine:
    """A configurable stand-in for `EncoderEngine`, served like one (`launch` returns a handle).

    Args:
        inner: a real engine whose rows are returned (its fingerprint and width too); None: fixed rows.
        width: embedding width of the fixed rows (15360 for FLUX.2-dev; 192 for the tiny test models).
        poison: a batch holding a prompt that contains it fails with "injected failure".
        fail_in: "launch" (the launch raises, as a host-side error would) or "result" (the handle raises,
            as a device fault would, while later batches may already be launched).
        hold_results: every handle waits in `result()` until the test calls its `release()`.
        launch_ops: imitated kernel launches per batch: short GIL-releasing torch calls in `launch`.
        device_ms_per_prompt: imitated device time; a batch's rows are ready once the device has run it,
            after the previous batch (a pipelined launch does not make the device faster).
        on_rows: called with (prompts, rows) as each batch is answered (e.g. to keep rows for analysis).
        distinct_rows: how many fixed rows the prompts share (picked by a hash of the prompt); None: every
            prompt gets a row of its own, drawn from a generator seeded by its hash (slower, and a row
            answered for the wrong prompt shows).
        tokenize: called with each batch's prompts before the fixed rows are made, e.g. a real engine's
            `tokenize`, so that the text meets the real tokenizer and chat template without the model's
            time (fuzzing: the decoder layers only ever see token ids).

    `fail_every_batch = True` fails every batch (as a GPU in a sticky error state would) until set back;
    `crash_worker()` makes the next launch kill the batcher's worker thread.

    `hold()` stops every later launch at a gate (on the batcher's worker thread, so requests pile up in
    the queue) until `release()`; `entered` is set whenever a launch reaches the engine. `batches`,
    `prompts_seen`, `batch_sizes` and `records` count what the engine was given.
    """

    def __init__(
        self,
        inner: Engine | None = None,
        *,
        width: int = 192,
        poison: str = POISON,
        fail_in: str = "launch",
        hold_results: bool = False,
        launch_ops: int = 0,
        device_ms_per_prompt: float = 0.0,
        on_rows: Callable[[list[str], torch.Tensor], None] | None = None,
        distinct_rows: int | None = 16,
        tokenize: Callable[[list[str]], object] | None = None,
    ):
        if fail_in not in ("launch", "result"):
            raise ValueError(f"fail_in must be 'launch' or 'result', got {fail_in!r}")
        self.inner = inner
        self.poison = poison
        self.fail_in = fail_in
        self.hold_results = hold_results
        self.launch_ops = launch_ops
        self.device_s_per_prompt = device_ms_per_prompt / 1000
        self.on_rows = on_rows
        self.tokenize = tokenize
        self.fail_every_batch = False
        self._crash_next = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []
        self.launched: list[FakeBatch] = []
        self.records: list[BatchRecord] = []
        self._own_batch_sizes: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._device_free_at = 0.0
        self._scratch = torch.zeros(8)
        #: Present when the inner engine tokenizes ahead (`EncoderEngine.tokenize_rows` / `launch_rows`): the
        #: server then serves this stand-in as it serves that engine, tokenizing on the batcher's tokenizer
        #: thread. Each row travels with its prompt, so poison, gate and records work on prompts as before.
        self.tokenize_rows: Callable[[list[str]], list[object]] | None = None
        self.launch_rows: Callable[[list[object]], FakeBatch] | None = None
        if inner is not None and hasattr(inner, "tokenize_rows") and hasattr(inner, "launch_rows"):
            self.tokenize_rows = self._tokenize_rows
            self.launch_rows = self._launch_rows
        if inner is None:
            self._fingerprint = make_fingerprint(
                FAMILIES["mistral3"],
                weights_id="fake",
                revision="none",
                dtype="bfloat16",
                precision="bf16",
                batching_mode="reproducible",
            )
            self._width = width
            gen = torch.Generator().manual_seed(0)
            max_length = self._fingerprint.max_length
            self._fixed = (
                torch.randn(distinct_rows, max_length, width, generator=gen, dtype=torch.bfloat16)
                if distinct_rows is not None
                else None
            )

    # -- what the server reads ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> Fingerprint:
        return self.inner.fingerprint if self.inner is not None else self._fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.inner.embedding_dim if self.inner is not None else self._width

    @property
    def batch_sizes(self) -> Counter[int]:
        """Model batches by size: the inner engine's (padding included) when there is one."""
        inner_sizes = getattr(self.inner, "batch_sizes", None)
        return inner_sizes if isinstance(inner_sizes, Counter) else self._own_batch_sizes

    def launch(self, prompts: list[str]) -> FakeBatch:
        return self._launch(list(prompts))

    def _tokenize_rows(self, prompts: list[str]) -> list[object]:
        return list(zip(prompts, self.inner.tokenize_rows(prompts), strict=True))  # type: ignore[union-attr]

    def _launch_rows(self, items: list[object]) -> FakeBatch:
        pairs: list[tuple[str, object]] = items  # type: ignore[assignment]
        return self._launch([p for p, _ in pairs], inner_rows=[row for _, row in pairs])

    def _launch(self, prompts: list[str], inner_rows: list[object] | None = None) -> FakeBatch:
        with self._lock:
            self.batches.append(prompts)
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("the test gate never opened")
        if self._crash_next:
            self._crash_next = False
            raise WorkerCrash("injected worker crash")
        poisoned = self.fail_every_batch or any(self.poison in p for p in prompts)
        if poisoned and self.fail_in == "launch":
            raise RuntimeError("injected failure")
        started = time.perf_counter()
        for _ in range(self.launch_ops):
            self._scratch.add_(1.0)  # torch releases the GIL in each op, as in a kernel launch
        rows = self._start(prompts, skip=poisoned, inner_rows=inner_rows)
        launched = time.perf_counter()
        record = BatchRecord(prompts, started, launched - started)
        with self._lock:
            self._device_free_at = max(launched, self._device_free_at) + self.device_s_per_prompt * len(prompts)
            batch = FakeBatch(self, record, rows, fail=poisoned, ready_at=self._device_free_at, held=self.hold_results)
            self.launched.append(batch)
            self.records.append(record)
            self._own_batch_sizes[len(prompts)] += 1
        return batch

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """launch + result, for callers outside the batcher."""
        return self.launch(prompts).result()

    def _start(self, prompts: list[str], *, skip: bool, inner_rows: list[object] | None) -> Callable[[], torch.Tensor]:
        if skip:
            return lambda: torch.empty(0)
        if self.tokenize is not None:
            self.tokenize(prompts)
        if self.inner is not None:
            handle = self.inner.launch(prompts) if inner_rows is None else self.inner.launch_rows(inner_rows)  # type: ignore[attr-defined]
            return handle.result
        # A row per prompt, the same for the same prompt whatever it is batched with; gathered into a
        # new tensor, as a real engine's output is new memory.
        hashes = [zlib.crc32(p.encode("utf-8", "surrogatepass")) for p in prompts]
        if self._fixed is None:
            shape = (self._fingerprint.max_length, self._width)
            rows = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(h), dtype=torch.bfloat16) for h in hashes]
            )
        else:
            rows = self._fixed[torch.tensor([h % len(self._fixed) for h in hashes])]
        return lambda: rows

    # -- what tests and benchmarks steer and read ---------------------------------------------------------
    def crash_worker(self) -> None:
        """The next launch raises `WorkerCrash`, which ends the batcher's worker thread."""
        self._crash_next = True

    def hold(self) -> None:
        """Stop later launches at the gate until `release()`."""
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def release_all(self) -> None:
        """Open the gate and release every held batch (test clean-up)."""
        self.gate.set()
        with self._lock:
            for batch in self.launched:
                batch.release()

    @property
    def prompts_seen(self) -> list[str]:
        with self._lock:
            return [p for batch in self.batches for p in batch]

    def reset_counts(self) -> None:
        with self._lock:
            self.batches.clear()
            self.launched.clear()
            self.records.clear()
            self._own_batch_sizes.clear()
        if self.inner is not None and isinstance(getattr(self.inner, "batch_sizes", None), Counter):
            self.inner.batch_sizes.clear()  # type: ignore[attr-defined]
